"""Writing cases in the FLARE layout (images/, labels/, manifest.json), gzip on two threads."""
from __future__ import annotations

import json
import os
import sys
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import SimpleITK as sitk

from flare_common.files import atomic_path, write_text_atomically

from .case import DEFAULT_HEALTHY_FRACTION, GENERATOR_VERSION, HEALTHY_INDEX_BASE, Phantom, PhantomError, TISSUE_NAMES
from .generate import flare_case_specs, generate_flare_case, generate_phantom


GZIP_LEVEL = 1
FILE_MODE = 0o644
GZIP_CHUNK = 16 << 20


def _deflate_chunk(data, last):
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)  # raw deflate, no per-chunk header
    # a sync flush ends a chunk on a byte boundary without ending the stream: chunks concatenate
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _gzip_file(src: Path, dst: Path, workers: int = 2) -> None:
    """gzip `src` into `dst` (one standard gzip member), deflating chunks in parallel threads."""
    with open(src, "rb") as source, open(dst, "wb") as target, ThreadPoolExecutor(workers) as pool:
        target.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff")  # magic, deflate, no mtime, fast, OS unknown
        crc, size, pending = 0, 0, []
        data = source.read(GZIP_CHUNK)
        while True:
            following = source.read(GZIP_CHUNK)
            crc = zlib.crc32(data, crc)
            size += len(data)
            pending.append(pool.submit(_deflate_chunk, data, not following))
            while len(pending) > workers or (not following and pending):
                target.write(pending.pop(0).result())
            if not following:
                break
            data = following
        target.write(struct.pack("<II", crc, size & 0xFFFFFFFF))


def _write_atomically(image: sitk.Image, path: Path) -> None:
    """Write `path` (.nii.gz) through temporary files beside it, then rename: never a partial output.

    SimpleITK writes the NIfTI (header and geometry); zlib compresses it at level 1 on two threads.
    ITK's NIfTI writer ignores SetCompressionLevel and gzips single-threaded at level 6, about four
    times slower for these volumes.
    """
    with atomic_path(path) as packed:
        raw = packed.with_name(packed.name.removesuffix(".gz"))
        sitk.WriteImage(image, str(raw), useCompression=False)
        _gzip_file(raw, packed)
        raw.unlink()
        os.chmod(packed, FILE_MODE)  # containers may run as another user


def write_case(phantom: Phantom, out_dir: str | Path) -> dict:
    """Write a phantom's image and label in the FLARE layout; returns its manifest entry."""
    out_dir = Path(out_dir)
    name = phantom.info["case"]
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    _write_atomically(phantom.label, out_dir / "labels" / f"{name}.nii.gz")
    _write_atomically(phantom.image, out_dir / "images" / f"{name}_0000.nii.gz")
    return dict(phantom.info, image=f"images/{name}_0000.nii.gz", label=f"labels/{name}.nii.gz")


def write_dataset(out_dir, cases: int, seed: int, flare_sizes: bool = False,
                  healthy_fraction: float = DEFAULT_HEALTHY_FRACTION, shape_zyx=None, spacing_zyx=None,
                  progress: bool = True) -> list[dict]:
    """Write `cases` phantoms (plus the eight FLARE efficiency cases) and manifest.json; the entries."""
    from tqdm import tqdm

    if cases < 0:
        raise PhantomError(f"number of cases must be >= 0, got {cases}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise PhantomError(f"healthy fraction must be within [0, 1], got {healthy_fraction}")
    jobs = [(i, None) for i in range(cases)]
    if flare_sizes:
        jobs += [(None, spec) for spec in flare_case_specs()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    # a bar on a terminal only: in a log, the closing line says it all
    for index, spec in tqdm(jobs, desc="phantoms", unit="case", disable=not (progress and sys.stderr.isatty())):
        if spec is None:
            phantom = generate_phantom(seed, index, shape_zyx, spacing_zyx, healthy_fraction=healthy_fraction)
        else:
            phantom = generate_flare_case(seed, spec["shape_zyx"][0], healthy_fraction)
        entries.append(write_case(phantom, out_dir))
        del phantom
    manifest = dict(generator="phantoms", version=GENERATOR_VERSION, seed=int(seed),
                    arguments=dict(cases=int(cases), seed=int(seed), flare_sizes=bool(flare_sizes),
                                   healthy_fraction=float(healthy_fraction),
                                   shape_zyx=[int(s) for s in shape_zyx] if shape_zyx else None,
                                   spacing_zyx=[float(s) for s in spacing_zyx] if spacing_zyx else None),
                    tissue_classes=list(TISSUE_NAMES), cases=entries)
    earlier = earlier_files(out_dir)
    with atomic_path(out_dir / "manifest.json") as written:
        written.write_text(json.dumps(manifest, indent=1))
        os.chmod(written, FILE_MODE)
    for stale in sorted(earlier - {out_dir / entry[key] for entry in entries for key in ("image", "label")}):
        stale.unlink(missing_ok=True)  # a case of an earlier run into this folder that this run did not write
    return entries


def earlier_files(out_dir: Path) -> set[Path]:
    """The images and labels an earlier run listed in `out_dir`'s manifest.json (only files it wrote itself:
    inside out_dir/images or out_dir/labels); an empty set where there is no such manifest."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
        entries = manifest["cases"] if manifest.get("generator") == "phantoms" else []
        listed = {out_dir / entry[key] for entry in entries for key in ("image", "label")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    folders = {(out_dir / "images").resolve(), (out_dir / "labels").resolve()}
    return {path for path in listed if path.resolve().parent in folders}


def write_eval_set(out: Path, seed: int, n_lesion: int, n_healthy: int, shape) -> list[dict]:
    """An evaluation set: lesion cases phantom_0000.. (healthy=False) and healthy cases healthy_0000.. (their
    own RNG indices, from HEALTHY_INDEX_BASE); reused as it is when its manifest holds the same arguments
    and generator version."""
    manifest_path = out / "manifest.json"
    wanted = {"seed": seed, "cases": n_lesion, "healthy": n_healthy, "shape": shape,
              "generator_version": GENERATOR_VERSION}  # a set from an older generator is made again
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("arguments") == wanted:
            return manifest["cases"]
    jobs = [(i, False, f"phantom_{i:04d}") for i in range(n_lesion)]
    jobs += [(HEALTHY_INDEX_BASE + i, True, f"healthy_{i:04d}") for i in range(n_healthy)]
    entries = []
    from tqdm import tqdm

    for index, healthy, name in tqdm(jobs, desc="eval phantoms", unit="case", disable=not sys.stderr.isatty()):
        phantom = generate_phantom(seed, index, shape_zyx=shape, healthy=healthy, name=name)
        entries.append(write_case(phantom, out))
        del phantom
    write_text_atomically(manifest_path, json.dumps({"arguments": wanted, "cases": entries}, indent=1))
    return entries
