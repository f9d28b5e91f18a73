"""Finding cases, reading images and writing masks: every image file the engine reads or writes goes through here,
checked (the other files it writes: the --timings report, through flare_common.files; the ONNX cache, through
export_onnx.py; the --ray journal, appended by scale_out.py)."""
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
from typing import Sequence

import numpy as np

import SimpleITK as sitk

from flare_common.files import atomic_path, itk_path

from .dicom_series import DicomSeries, find_series, is_dicom_file, read_series, series_of_file
from .errors import CaseError

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["IMAGE_SUFFIXES", "Case", "case_id", "check_file_can_be_written", "find_cases", "read_checked",
           "split_suffix", "write_image_atomically"]

Case = Path | DicomSeries  # a case: an image file, or a DICOM series (dicom_series.py)

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


def case_id(path: Case) -> str:
    """`<case>_0000.nii.gz` -> `<case>`: outputs drop the channel suffix, as FLARE expects; a DICOM series' own id."""
    if isinstance(path, DicomSeries):
        return path.case_id
    stem, _ = split_suffix(path.name)
    return stem[: -len(CHANNEL_SUFFIX)] if stem.endswith(CHANNEL_SUFFIX) else stem


@dataclass
class CaseScan:
    """What an input folder holds: the cases, image-like entries that are not cases (and why), and
    image-like entries that should be cases but cannot be read (each a failed case)."""

    cases: list[Case]
    skipped: list[tuple[Path, str]]
    broken: list[tuple[Path, str]]


def find_cases(input_dir: str | Path) -> CaseScan:
    """Image files of the first channel, sorted. Every entry with an image suffix is a case, skipped with a
    reason (hidden, another channel) or broken (a dangling link, a folder); a folder with no case at all is
    an error. `input_dir` may also be one image file: the one case. A folder without images whose files (at any
    depth) are DICOM holds DICOM series: each a case (dicom_series.py), a series that cannot be a correct
    volume broken with its reason; so does one DICOM file, the series it belongs to."""
    input_dir = Path(input_dir)
    if input_dir.is_file():  # one image: the case it is
        if is_dicom_file(input_dir):
            return series_scan([series_of_file(input_dir)], [])
        if not split_suffix(input_dir.name)[1]:
            raise CaseError(f"{input_dir}: not an image ({', '.join(IMAGE_SUFFIXES)}) nor a folder of them")
        return CaseScan([input_dir], [], [])
    if not input_dir.is_dir():
        raise CaseError(f"{input_dir}: input folder or image not found")
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
        series, unreadable = find_series(input_dir)
        if series or unreadable:
            return series_scan(series, unreadable)
        raise CaseError(f"{input_dir}: no case in it (no {', '.join(IMAGE_SUFFIXES)} file and no DICOM series"
                        + (f"; {len(scan.skipped)} skipped" if scan.skipped else "") + ")")
    return scan


def series_scan(series: list[DicomSeries], unreadable: list[tuple[Path, str]]) -> CaseScan:
    """The cases of DICOM input: each series that is a correct volume; a faulty CT series broken, with the reason; a
    series that is no CT volume and an unreadable DICOM file skipped, with theirs."""
    skipped = [(s, s.skipped) for s in series if s.skipped is not None]
    return CaseScan([s for s in series if s.problem is None and s.skipped is None],
                    list(unreadable) + [(s, reason) for s, reason in skipped],
                    [(s, s.problem) for s in series if s.problem is not None])


def output_paths(cases: list[Case], output_dir: str | Path, suffix: str = ".nii.gz") -> dict[Case, Path]:
    """Each case's mask path, `<output_dir>/<case>.nii.gz`. Refuses (CaseError) before any work when two
    cases would write the same mask, or a mask would replace an input."""
    output_dir = Path(output_dir)
    planned: dict[Case, Path] = {}
    writers: dict[Path, Case] = {}
    inputs = {file.resolve() for path in cases for file in (path.files if isinstance(path, DicomSeries) else [path])}
    for path in cases:
        output = output_dir / f"{case_id(path)}{suffix}"
        key = output.resolve()
        if key in writers:
            raise CaseError(f"{writers[key]} and {path} would both be written to {output}; rename one")
        if key in inputs:
            raise CaseError(f"{output}: the mask of {path.name} would replace an input image; use another "
                            "output folder")
        writers[key], planned[path] = path, output
    return planned


def set_aside_earlier_masks(scan: CaseScan, output_dir: str | Path) -> None:
    """Where the output folder is the input folder, `<case>.nii.gz` beside `<case>_0000.*` is that case's mask
    from an earlier run, not a case: moved to the skipped entries, with the reason."""
    if not scan.cases or isinstance(scan.cases[0], DicomSeries) or \
            scan.cases[0].parent.resolve() != Path(output_dir).resolve():
        return
    first_channels = {case_id(path) for path in scan.cases + [path for path, _ in scan.broken]
                      if split_suffix(path.name)[0].endswith(CHANNEL_SUFFIX)}
    cases = []
    for path in scan.cases:
        stem, _ = split_suffix(path.name)
        if path.name == f"{stem}.nii.gz" and stem in first_channels:
            scan.skipped.append((path, f"the mask of {stem}{CHANNEL_SUFFIX} from an earlier run (the output "
                                       "folder is the input folder)"))
        else:
            cases.append(path)
    scan.cases[:] = cases


def check_file_can_be_written(path: Path, flag: str) -> None:
    """CaseError, before any work, unless a file can be created at `path` (named by the flag `flag`)."""
    folder = path.parent
    if path.is_dir():
        raise CaseError(f"{path}: {flag} names a folder, not a file")
    if not folder.is_dir():
        raise CaseError(f"{path}: {flag}: the folder {folder} does not exist")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise CaseError(f"{path}: {flag}: the folder {folder} cannot be written ({err.strerror or err})") from None


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


def read_image(path: str | Case) -> sitk.Image:
    """A case's CT image, checked before its voxels are read (read_checked; non-positive spacing, a grid a mask
    cannot be written on) and after (NaN voxels); a DICOM series' through dicom_series.read_series."""
    if isinstance(path, DicomSeries):
        return read_series(path)
    path = Path(path)

    def check_case_header(header: sitk.ImageFileReader) -> None:
        if min(header.GetSize()) < 1 or min(header.GetSpacing()) <= 0:
            raise CaseError(f"{path}: empty image or non-positive spacing {header.GetSpacing()}")
        check_orthonormal(path, header)
        warn_if_skewed_nifti(path)

    return replace_non_finite(read_checked(path, check_case_header), path)


def read_checked(path: str | Path, check_header=None) -> sitk.Image:
    """A 3D scalar image, its header checked before the voxels are allocated: a size the file cannot hold (a
    header bomb), a truncated NIfTI; `check_header(reader)` adds checks. CaseError naming the file otherwise.
    Any path, also one SimpleITK cannot take (itk_path)."""
    path = Path(path)
    with itk_path(path) as name:
        header = read_header(path, name)
        if header.GetDimension() != 3:
            raise CaseError(f"{path}: expected a 3D image, got {header.GetDimension()}D")
        if header.GetNumberOfComponents() != 1:
            raise CaseError(f"{path}: expected a scalar image, got "
                            f"{header.GetNumberOfComponents()} components per voxel")
        check_declared_size(path, header)
        check_nifti_data_length(path)
        if check_header is not None:
            check_header(header)
        try:
            return header.Execute()
        except RuntimeError as err:
            raise CaseError(f"{path}: cannot read image ({sitk_reason(str(err))})") from None


def read_header(path: Path, name: str | None = None) -> sitk.ImageFileReader:
    """A reader holding `path`'s header (size, spacing, origin, direction, pixel type, metadata), no voxels
    read; `name`: the path as SimpleITK takes it (itk_path). CaseError when it cannot be read."""
    reader = sitk.ImageFileReader()
    if name is None:
        with itk_path(path) as name:
            return read_header(path, name)
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise CaseError(f"{path}: cannot read image ({sitk_reason(str(err))})") from None
    return reader


MAX_IMAGE_VOXELS = 2 ** 31  # 8 GB of float32: over four times a 512x512x2000 CT
DEFLATE_MAX_RATIO = 1032  # zlib's ceiling: no deflate stream expands by more


def _metaimage_storage(path: Path) -> str:
    """How an .mha / .nrrd file holds its voxels: "raw", "compressed" or "detached" (in another file)."""
    with open(path, "rb") as f:
        header = f.read(1 << 16).split(b"\n\n", 1)[0].decode("latin-1")
    fields = {}
    for line in header.splitlines():
        key, separator, value = line.replace("=", ":", 1).partition(":")
        if separator:
            fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break  # MetaIO's last header line: the voxels follow
    if path.name.lower().endswith(".mha"):
        if fields.get("elementdatafile", "LOCAL").upper() != "LOCAL":
            return "detached"
        return "compressed" if fields.get("compresseddata", "false").lower() == "true" else "raw"
    if "data file" in fields or "datafile" in fields:
        return "detached"
    return "raw" if fields.get("encoding", "raw").lower() == "raw" else "compressed"


def check_declared_size(path: Path, header: sitk.ImageFileReader) -> None:
    """Refuse (CaseError) a header that declares more voxels than the file can hold, before they are allocated:
    a 93-byte .nii.gz can declare 1000^3 voxels (2 GB). Compressed data expands at most DEFLATE_MAX_RATIO
    times; raw data is as large as declared. Voxels kept in another file than the header are refused."""
    voxels = float(np.prod(header.GetSize(), dtype=np.float64))
    bytes_per_voxel = _PIXEL_BYTES.get(header.GetPixelID(), 8) * max(1, header.GetNumberOfComponents())
    declared = voxels * bytes_per_voxel
    name = path.name.lower()
    file_bytes = path.stat().st_size
    if name.endswith((".mha", ".nrrd")):
        storage = _metaimage_storage(path)
        if storage == "detached":
            raise CaseError(f"{path}: its voxels are kept in another file than its header; only single-file "
                            "images are read")
        capacity = file_bytes * (DEFLATE_MAX_RATIO if storage == "compressed" else 1)
    elif name.endswith(".gz"):
        capacity = file_bytes * DEFLATE_MAX_RATIO
    else:
        capacity = file_bytes
    size = "x".join(map(str, header.GetSize()))
    if voxels > MAX_IMAGE_VOXELS:
        raise CaseError(f"{path}: its header declares {size} voxels, over the limit of {MAX_IMAGE_VOXELS:,}")
    if declared > capacity:
        raise CaseError(f"{path}: its header declares {size} voxels ({declared / 1e6:,.0f} MB), more than its "
                        f"{file_bytes:,} bytes can hold: truncated or corrupt")


_PIXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}


def check_orthonormal(path: Path, header: sitk.ImageFileReader) -> None:
    """Refuse (CaseError) a grid whose axes are not perpendicular unit vectors (a sheared .mha) where it matters:
    a NIfTI mask cannot carry such a grid, and ITK writes the mask on the nearest orthonormal one without an
    error. Rounding in a header (directions from DICOM's six decimals) moves it by far less than the write check
    tolerates (GRID_TOLERANCE_VOXELS) and passes; a real shear is refused before any work."""
    size, spacing, origin = header.GetSize(), header.GetSpacing(), header.GetOrigin()
    matrix = np.asarray(header.GetDirection(), dtype=np.float64).reshape(3, 3)
    left, _, right = np.linalg.svd(matrix)
    nearest = left @ right  # the orthonormal matrix closest to it, where ITK's NIfTI writer puts the mask
    moved = float(np.linalg.norm(grid_corners(size, spacing, origin, matrix.ravel())
                                 - grid_corners(size, spacing, origin, nearest.ravel()), axis=1).max())
    if moved <= GRID_TOLERANCE_VOXELS * min(spacing):
        return
    lengths = np.linalg.norm(matrix, axis=0)
    cosines = np.clip((matrix / lengths).T @ (matrix / lengths), -1, 1)
    worst = float(np.degrees(np.arccos(np.abs(cosines[np.triu_indices(3, 1)]).max())))
    raise CaseError(f"{path}: its direction matrix is not orthonormal (axes {worst:.1f} degrees apart, or not of "
                    f"unit length): a NIfTI mask cannot carry this grid (written, it would move by up to "
                    f"{moved:.3g} mm); resample the image onto an orthonormal grid first")


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


def write_image_atomically(image: sitk.Image, path: str | Path, note: str | None = None) -> None:
    """Write into a hidden partial folder beside the target, check what was written, then rename: no partial,
    cut-short or moved mask ever exists under its final name. `note`: what produced the mask (provenance.py),
    kept in the NIfTI header's `descrip`.

    ITK reports some write failures (a full disk among them) only on stderr and returns normally, and writes
    a grid NIfTI cannot hold on another one without an error, so the written file is checked: complete voxel
    data, its header's grid the image's (size, and every corner within a tenth of a voxel) and the note.
    A failed check is a CaseError and nothing is left behind.
    """
    path = Path(path)
    if note is not None:
        image.SetMetaData(NOTE_KEY, note)
    try:
        with atomic_path(path, prefix=PARTIAL_PREFIX) as written, itk_path(written) as name:
            try:
                sitk.WriteImage(image, name, useCompression=True)
            except RuntimeError as err:
                raise CaseError(f"{path}: cannot write the mask ({sitk_reason(str(err))})") from None
            verify_written(written, image, path, note)
            os.chmod(written, 0o644)  # the organisers read outputs as another user
    except OSError as err:
        raise CaseError(f"{path}: cannot write the mask ({err.strerror or err})") from None


def write_seg_atomically(mask: sitk.Image, series: DicomSeries, path: str | Path, model_name: str,
                         probability: bool = False) -> None:
    """The mask as a DICOM SEG of `series` (dicom_seg.py; with `probability`, the uint8 lesion probability as a
    FRACTIONAL SEG), written as a mask is (a hidden partial file, renamed when whole), then read back and checked: a
    SEG of this series' study and frame of reference, whose frames reference its slices and hold the mask (or the
    probability's bytes), voxel for voxel."""
    from .dicom_seg import read_seg_mask, source_datasets, write_seg  # highdicom: only where a SEG is written

    path = Path(path)
    array = sitk.GetArrayViewFromImage(mask)
    expected = array if probability else array > 0
    try:
        sources = source_datasets(series)  # read once, for the SEG and for its check
        with atomic_path(path, prefix=PARTIAL_PREFIX) as written:
            write_seg(array, series, written, model_name, probability, sources)
            if not np.array_equal(read_seg_mask(written, series, sources), expected):
                raise CaseError(f"{path}: the SEG written does not read back as the mask")
            os.chmod(written, 0o644)
    except OSError as err:
        raise CaseError(f"{path}: cannot write the SEG ({err.strerror or err})") from None


NOTE_KEY = "ITK_FileNotes"  # ITK's NIfTI writer puts it in the header's `descrip` (80 bytes), its reader back
FAILED_NOTE = "flare-lesion failed case, empty mask (--on-error empty)"  # never kept as a finished mask
MAX_EMPTY_MASK_VOXELS = 2 ** 31  # an empty mask is written only for a plausible header (2 GB of uint8)


def write_empty_mask(source: Case, path: Path) -> None:
    """An all-zero mask on `source`'s grid (read from its header only), written as a mask is: for a case
    that failed, in challenge mode, since a missing output scores zero anyway. Its note (FAILED_NOTE) says it
    is no finished mask. CaseError if the header cannot be read, and for a DICOM series (FLARE's contract is
    NIfTI: a hospital's failed series gets no mask, and its line)."""
    if isinstance(source, DicomSeries):
        raise CaseError(f"{source}: no empty mask for a DICOM series (--on-error empty is for NIfTI cases)")
    try:
        reader = read_header(source)
    except CaseError as err:
        raise CaseError(f"{source}: no empty mask either: header unreadable "
                        f"({str(err).removeprefix(f'{source}: ')})") from None
    size = reader.GetSize()
    if len(size) != 3 or np.prod(size, dtype=np.float64) > MAX_EMPTY_MASK_VOXELS:
        raise CaseError(f"{source}: no empty mask either: implausible size {size}")
    empty = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    empty.SetSpacing(reader.GetSpacing())
    empty.SetOrigin(reader.GetOrigin())
    empty.SetDirection(reader.GetDirection())
    write_image_atomically(empty, path, FAILED_NOTE)


def grid_corners(size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                 direction: Sequence[float]) -> np.ndarray:
    """The physical points (mm) of the 8 outer corners of a grid (voxel edges, not centres, so that an axis
    of one voxel still counts its spacing and direction)."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    indices = np.array([[(-0.5 if bit == 0 else n - 0.5) for bit, n in zip(bits, size)]
                        for bits in np.ndindex(2, 2, 2)], dtype=np.float64)
    return np.asarray(origin, dtype=np.float64) + indices @ matrix.T


# A tenth of the smallest voxel: far below what any metric sees (NSD tolerates 2 mm), far above the float32
# rounding of a NIfTI header (1e-4 mm), and what ITK's orthonormalisation of a DICOM direction's six decimals
# moves a 512 x 512 x 300 grid by (0.002 mm for 1e-5).
GRID_TOLERANCE_VOXELS = 0.1


def grid_difference(expected, actual) -> str:
    """'' when `actual` lies on `expected`'s grid (each an image or a header reader): the same size and every
    outer corner within GRID_TOLERANCE_VOXELS of the smallest voxel; else what differs, in one phrase."""
    def grid(item):
        return item.GetSize(), item.GetSpacing(), item.GetOrigin(), item.GetDirection()

    want, got = grid(expected), grid(actual)
    if tuple(want[0]) != tuple(got[0]):
        return f"size {tuple(got[0])} instead of {tuple(want[0])}"
    moved = float(np.linalg.norm(grid_corners(*want) - grid_corners(*got), axis=1).max())
    if not moved <= GRID_TOLERANCE_VOXELS * min(want[1]):
        return (f"its grid is moved by up to {moved:.3g} mm (origin {_rounded(got[2])}, spacing {_rounded(got[1])}, "
                f"direction {_rounded(got[3])} instead of {_rounded(want[2])}, {_rounded(want[1])}, "
                f"{_rounded(want[3])})")
    return ""


def _rounded(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def verify_written(written: Path, image: sitk.Image, target: Path, note: str | None = None) -> None:
    """CaseError naming `target` unless `written` holds the whole image on its grid (see
    write_image_atomically)."""
    try:
        complete = written.stat().st_size > 0
        check_nifti_data_length(written)
        header = read_header(written)
    except (CaseError, OSError):
        complete = False
    if not complete:
        raise CaseError(f"{target}: the mask was not written completely (disk full or write error)")
    moved = grid_difference(image, header)
    if moved:
        raise CaseError(f"{target}: not written: the file format cannot hold the input's grid ({moved})")
    if note is not None and read_note(header) != note:
        raise CaseError(f"{target}: the mask was not written completely (its header lost the provenance note)")


def read_note(header: sitk.ImageFileReader) -> str | None:
    """The provenance note of a mask's header (write_image_atomically), None where there is none."""
    for key in (NOTE_KEY, "descrip"):
        if header.HasMetaDataKey(key) and header.GetMetaData(key).strip():
            return header.GetMetaData(key).strip()
    return None


def reusable_mask_problem(source: Path, mask: Path, note: str | None) -> str | None:
    """Why the mask already at `mask` must not be kept as `source`'s (--skip-existing, a resumed Ray run), or
    None when it passes every check a fresh write passes and was made as this run would make it: `note`, the
    provenance this run writes (None: nothing is kept)."""
    if not mask.is_file():
        return "no mask"
    if note is None:
        return "this run's settings cannot be fingerprinted"
    try:
        if mask.stat().st_size == 0:
            return "an empty file"
        check_nifti_data_length(mask)
        header = read_header(mask)
        recorded = read_note(header)
        if recorded == FAILED_NOTE:
            return "the empty mask of a failed case"
        if recorded != note:
            return ("made by another model, other settings or from another input" if recorded
                    else "no record of what made it")
        moved = grid_difference(read_header(source), header)
        if moved:
            return f"not on the input's grid: {moved}"
    except (CaseError, OSError) as err:
        return f"unreadable ({str(err).removeprefix(f'{mask}: ')})"
    return None
