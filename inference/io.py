"""Reading cases and writing masks. The only module that talks to the file system."""
from __future__ import annotations

import gzip
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

import SimpleITK as sitk

from .errors import CaseError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
CHANNEL_SUFFIX = "_0000"


def split_suffix(name: str) -> tuple[str, str]:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def case_id(path: Path) -> str:
    """`<case>_0000.nii.gz` -> `<case>`: outputs drop the channel suffix, as FLARE expects."""
    stem, _ = split_suffix(path.name)
    return stem[: -len(CHANNEL_SUFFIX)] if stem.endswith(CHANNEL_SUFFIX) else stem


def find_cases(input_dir: str | Path) -> list[Path]:
    """Image files of the first channel, sorted; other channels (_0001, ...) are not cases."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise CaseError(f"{input_dir}: input folder not found")
    cases = []
    for path in sorted(input_dir.iterdir()):
        stem, suffix = split_suffix(path.name)
        if not suffix or not path.is_file() or path.name.startswith("."):
            continue
        if stem[-5:-4] == "_" and stem[-4:].isdigit() and not stem.endswith(CHANNEL_SUFFIX):
            continue
        cases.append(path)
    return cases


def read_image(path: str | Path) -> sitk.Image:
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise CaseError(f"{path}: cannot read image ({_sitk_reason(str(err))})") from None
    check_nifti_data_length(path)
    if image.GetDimension() != 3:
        raise CaseError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{path}: expected a scalar image, got "
                        f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    if min(image.GetSize()) < 1 or min(image.GetSpacing()) <= 0:
        raise CaseError(f"{path}: empty image or non-positive spacing {image.GetSpacing()}")
    return image


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
        else:
            with open(path, "rb") as f:
                header = f.read(544)
            expected = _nifti_expected_bytes(header)
            complete = expected is None or path.stat().st_size >= expected
    except (OSError, EOFError, struct.error):
        complete = False
    if not complete:
        raise CaseError(f"{path}: truncated or corrupt NIfTI file (less voxel data than its header declares)")


def _sitk_reason(message: str) -> str:
    """The informative part of a SimpleITK/ITK exception, which starts with source file locations."""
    for line in message.splitlines():
        if "ERROR:" in line:
            reason = line.split("ERROR:", 1)[1].strip()
            if "Unable to determine ImageIO reader" in reason:
                return "not a readable image: unknown format, truncated or corrupt"
            return reason[:200]
    return "corrupt or unsupported file"


def write_image_atomically(image: sitk.Image, path: str | Path) -> None:
    """Write to a temporary file beside the target, then rename: no partial output ever exists."""
    path = Path(path)
    _, suffix = split_suffix(path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp_", suffix=suffix or ".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp_name, useCompression=True)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; the organisers read outputs as another user
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
