"""Reading cases and writing masks. The only module that talks to the file system."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import SimpleITK as sitk

from flare_common.files import atomic_path

from .errors import CaseError

log = logging.getLogger("inference")

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
CHANNEL_SUFFIX = "_0000"
# Masks are written into a hidden folder of this prefix inside the output folder, then renamed into place:
# a scorer listing `*.nii.gz` never sees a partial mask, even one a killed run left behind.
PARTIAL_PREFIX = ".flare-partial-"
STALE_PARTIAL_S = 600  # a mask is written in seconds: a partial folder this old was left by a killed run


def split_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) for an image file name; the suffix is matched case-insensitively (`.NII.GZ`)."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def case_id(path: Path) -> str:
    """`<case>_0000.nii.gz` -> `<case>`: outputs drop the channel suffix, as FLARE expects."""
    stem, _ = split_suffix(path.name)
    return stem[: -len(CHANNEL_SUFFIX)] if stem.endswith(CHANNEL_SUFFIX) else stem


@dataclass
class CaseScan:
    """What an input folder holds: the cases, image-like entries that are not cases (and why), and
    image-like entries that should be cases but cannot be read (each a failed case)."""

    cases: list[Path]
    skipped: list[tuple[Path, str]]
    broken: list[tuple[Path, str]]


def find_cases(input_dir: str | Path) -> CaseScan:
    """Image files of the first channel, sorted. Every entry with an image suffix is a case, skipped with a
    reason (hidden, another channel) or broken (a dangling link, a folder); a folder with no case at all is
    an error."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise CaseError(f"{input_dir}: input folder not found")
    scan = CaseScan([], [], [])
    for path in sorted(input_dir.iterdir()):
        stem, suffix = split_suffix(path.name)
        if not suffix:
            continue
        if path.name.startswith("."):
            scan.skipped.append((path, "hidden file"))
        elif stem[-5:-4] == "_" and stem[-4:].isdigit() and not stem.endswith(CHANNEL_SUFFIX):
            scan.skipped.append((path, f"channel {stem[-4:]} of a multi-channel case (only {CHANNEL_SUFFIX} is read)"))
        elif path.is_symlink() and not path.exists():
            scan.broken.append((path, f"dangling symbolic link to {os.readlink(path)}"))
        elif not path.is_file():
            scan.broken.append((path, "not a file"))
        else:
            scan.cases.append(path)
    if not scan.cases and not scan.broken:
        raise CaseError(f"{input_dir}: no case in it (no {', '.join(IMAGE_SUFFIXES)} file"
                        + (f"; {len(scan.skipped)} skipped" if scan.skipped else "") + ")")
    return scan


def output_paths(cases: list[Path], output_dir: str | Path) -> dict[Path, Path]:
    """Each case's mask path, `<output_dir>/<case>.nii.gz`. Refuses (CaseError) before any work when two
    cases would write the same mask, or a mask would replace an input."""
    output_dir = Path(output_dir)
    planned: dict[Path, Path] = {}
    writers: dict[Path, Path] = {}
    inputs = {path.resolve() for path in cases}
    for path in cases:
        output = output_dir / f"{case_id(path)}.nii.gz"
        key = output.resolve()
        if key in writers:
            raise CaseError(f"{writers[key]} and {path} would both be written to {output}; rename one")
        if key in inputs:
            raise CaseError(f"{output}: the mask of {path.name} would replace an input image; use another "
                            "output folder")
        writers[key], planned[path] = path, output
    return planned


def prepare_output_folder(output_dir: str | Path) -> None:
    """Create the output folder, check it is writable (before any case runs the network), and remove
    partial masks that a killed run left in it."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryDirectory(prefix=PARTIAL_PREFIX, dir=output_dir)
        probe.cleanup()
    except OSError as err:
        raise CaseError(f"{output_dir}: output folder cannot be written ({err.strerror or err})") from None
    now = time.time()
    for stale in output_dir.glob(f"{PARTIAL_PREFIX}*"):
        try:
            if now - stale.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def read_image(path: str | Path) -> sitk.Image:
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise CaseError(f"{path}: cannot read image ({sitk_reason(str(err))})") from None
    check_nifti_data_length(path)
    if image.GetDimension() != 3:
        raise CaseError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{path}: expected a scalar image, got "
                        f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    if min(image.GetSize()) < 1 or min(image.GetSpacing()) <= 0:
        raise CaseError(f"{path}: empty image or non-positive spacing {image.GetSpacing()}")
    warn_if_skewed_nifti(path)
    return replace_non_finite(image, path)


def replace_non_finite(image: sitk.Image, path: Path) -> sitk.Image:
    """NaN and infinite voxels (float .mha/.nrrd; ITK's NIfTI reader already zeroes them) set to the lowest
    finite value, with a warning: left in, they turn every window that touches them into background."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return image
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if finite.all():
        return image
    if not finite.any():
        raise CaseError(f"{path}: no voxel has a finite value")
    fill = array[finite].min()
    repaired = sitk.GetImageFromArray(np.where(finite, array, fill).astype(array.dtype))
    repaired.CopyInformation(image)
    log.warning("warning: %s: %d NaN or infinite voxel(s) set to the lowest finite value, %g",
                path, finite.size - np.count_nonzero(finite), fill)
    return repaired


def warn_if_skewed_nifti(path: Path) -> None:
    """Warn (one line) when a NIfTI-1 sform's axes are not perpendicular: ITK then silently reads the
    qform instead, so the mask is written on ITK's orthonormal reading of the geometry."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            header = f.read(348)
        endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
        if struct.unpack(endian + "i", header[:4])[0] != 348 or struct.unpack(endian + "h", header[254:256])[0] <= 0:
            return
        rows = np.array([struct.unpack(endian + "4f", header[offset:offset + 16]) for offset in (280, 296, 312)])
    except (OSError, EOFError, struct.error):
        return
    axes = rows[:, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if not np.all(lengths > 0):
        return
    cosines = (axes / lengths).T @ (axes / lengths)
    worst = float(np.abs(cosines - np.eye(3)).max())
    if worst > 1e-4:
        log.warning("warning: %s: the header's sform axes are not perpendicular (cosine %.4f); ITK reads the "
                    "qform instead, and the mask is written on that geometry", path, worst)


def _nifti_expected_bytes(header: bytes) -> int | None:
    """vox_offset + voxel count x bytes per voxel, from a NIfTI-1 or NIfTI-2 header (either byte order)."""
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr == 348 and len(header) >= 112:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 176:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    n_dims = dims[0]
    if not 1 <= n_dims <= 7:
        return None
    voxels = int(np.prod([max(1, d) for d in dims[1:n_dims + 1]], dtype=np.int64))
    return max(vox_offset, 352 if sizeof_hdr == 348 else 544) + voxels * bitpix // 8


def check_nifti_data_length(path: Path) -> None:
    """Refuse a truncated NIfTI: ITK reads one without complaint and fills the missing voxels with zeros.

    For .nii.gz the gzip trailer holds the uncompressed size (mod 2^32), so no decompression is needed.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                header = f.read(544)
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                (stored_size,) = struct.unpack("<I", f.read(4))
            expected = _nifti_expected_bytes(header)
            complete = expected is None or stored_size == expected % 2 ** 32
            if not complete:
                # The trailer holds only the last member's size: a multi-member (bgzip) file, or one padded
                # with zeros after the stream, ends otherwise. Count the data itself (rare, so not slow).
                complete = _gzip_data_length(path) >= expected
        else:
            with open(path, "rb") as f:
                header = f.read(544)
            expected = _nifti_expected_bytes(header)
            complete = expected is None or path.stat().st_size >= expected
    except (OSError, EOFError, struct.error):
        complete = False
    if not complete:
        raise CaseError(f"{path}: truncated or corrupt NIfTI file (less voxel data than its header declares)")


def _gzip_data_length(path: Path) -> int:
    """Uncompressed bytes of every gzip member of `path` (trailing zero padding ignored, as by gzip)."""
    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            total += len(chunk)
    return total


def sitk_reason(message: str) -> str:
    """The informative part of a SimpleITK/ITK exception, which starts with source file locations."""
    for line in message.splitlines():
        if "ERROR:" in line:
            reason = line.split("ERROR:", 1)[1].strip()
            if "Unable to determine ImageIO reader" in reason:
                return "not a readable image: unknown format, truncated or corrupt"
            return reason[:200]
    return "corrupt or unsupported file"


def write_image_atomically(image: sitk.Image, path: str | Path) -> None:
    """Write into a hidden partial folder beside the target, check what was written, then rename: no partial
    or cut-short mask ever exists under its final name.

    ITK reports some write failures (a full disk among them) only on stderr and returns normally, so the
    written file is checked: complete voxel data (check_nifti_data_length) and a readable header with the
    image's size. A failed check is a CaseError and nothing is left behind.
    """
    path = Path(path)
    try:
        with atomic_path(path, prefix=PARTIAL_PREFIX) as written:
            try:
                sitk.WriteImage(image, str(written), useCompression=True)
            except RuntimeError as err:
                raise CaseError(f"{path}: cannot write the mask ({sitk_reason(str(err))})") from None
            verify_written(written, image, path)
            os.chmod(written, 0o644)  # the organisers read outputs as another user
    except OSError as err:
        raise CaseError(f"{path}: cannot write the mask ({err.strerror or err})") from None


MAX_EMPTY_MASK_VOXELS = 2 ** 31  # an empty mask is written only for a plausible header (2 GB of uint8)


def write_empty_mask(source: Path, path: Path) -> None:
    """An all-zero mask on `source`'s grid (read from its header only), written as a mask is: for a case
    that failed, in challenge mode, since a missing output scores zero anyway. CaseError if the header
    cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise CaseError(f"{source}: no empty mask either: header unreadable ({sitk_reason(str(err))})") from None
    size = reader.GetSize()
    if len(size) != 3 or np.prod(size, dtype=np.float64) > MAX_EMPTY_MASK_VOXELS:
        raise CaseError(f"{source}: no empty mask either: implausible size {size}")
    empty = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    empty.SetSpacing(reader.GetSpacing())
    empty.SetOrigin(reader.GetOrigin())
    empty.SetDirection(reader.GetDirection())
    write_image_atomically(empty, path)


def verify_written(written: Path, image: sitk.Image, target: Path) -> None:
    """CaseError naming `target` unless `written` holds the whole image (see write_image_atomically)."""
    try:
        size_ok = written.stat().st_size > 0
        check_nifti_data_length(written)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(written))
        reader.ReadImageInformation()
        header_ok = reader.GetSize() == image.GetSize()
    except (CaseError, RuntimeError, OSError):
        size_ok = header_ok = False
    if not (size_ok and header_ok):
        raise CaseError(f"{target}: the mask was not written completely (disk full or write error)")
