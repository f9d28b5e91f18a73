"""DICOM CT series as cases: found in a folder (files in any order, in subfolders or mixed, grouped by
SeriesInstanceUID), checked to be one correct 3D volume, and read with SimpleITK/GDCM (geometry from
ImagePositionPatient and ImageOrientationPatient, the rescale slope and intercept applied).

A series that is no CT volume at all (another modality or SOP class, a scout series, a single image such as a dose
report) is skipped with one line: a study's folder holds such series routinely. A CT series that cannot be a correct
volume is refused in one line naming it, a failed case: a localizer among its slices, mixed orientations or
matrices, a gantry tilt (never resampled silently: TotalSegmentator and dcm2niix resample a tilt, which moves every
voxel; a tilted series is refused here with the angle, for the sender to reconstruct it untilted), slices at
non-uniform spacing beyond SPACING_TOLERANCE, missing or repeated slices, an implausible grid.

pydicom reads the headers (no pixel data) to find and check the series; SimpleITK reads the voxels of exactly the
files found, in the order of their positions along the slice normal.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import CaseError

log = logging.getLogger("inference")

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["DicomSeries", "find_series", "is_dicom_file", "read_series", "series_of_file"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
# relative deviation of a slice gap from the series' median gap still taken as uniform (dcm2niix warns from about
# 1 %); a gap of MISSING_GAP x the median or more is missing slices
SPACING_TOLERANCE = 0.01
MISSING_GAP = 1.5
ORIENTATION_TOLERANCE = 1e-4  # direction cosines' difference for "the same orientation"
TILT_TOLERANCE_DEG = 0.05
MAX_VOXELS = 2 ** 31  # a series larger than this is no CT (a header's rows, columns or count gone wrong)
HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "StudyInstanceUID", "PatientID",
               "StudyDate", "SeriesNumber", "SeriesDescription", "ImageType", "ImagePositionPatient",
               "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "GantryDetectorTilt",
               "FrameOfReferenceUID", "NumberOfFrames", "InstanceNumber"]


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """One series of an input folder: a case. Identified by its SeriesInstanceUID; `case_id` names its outputs
    (PatientID_StudyDate_SeriesNumber, made file-safe and unique in the run); `files` are in slice order once
    checked (check_series), else as found."""

    uid: str
    case_id: str
    files: tuple[Path, ...]
    modality: str = ""
    description: str = ""
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    problem: str | None = field(default=None)  # why it cannot be a correct volume: a failed case (check_series)
    skipped: str | None = field(default=None)  # why it is no CT volume at all (a dose report, an MR): not a case

    @property
    def name(self) -> str:  # what a case is called in reports and journals, as a file's name is
        return self.case_id

    @property
    def folder(self) -> Path:
        return self.files[0].parent

    def __str__(self) -> str:
        return f"{self.folder}: series {self.case_id} ({self.uid})"

    def __hash__(self) -> int:
        return hash(self.uid)

    def __eq__(self, other) -> bool:
        return isinstance(other, DicomSeries) and other.uid == self.uid

    def fingerprint(self) -> str:
        """What the series' files hold, as provenance.input_fingerprint does for a file: names, sizes and times."""
        digest = hashlib.sha256(self.uid.encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: the 'DICM' magic after the 128-byte preamble."""
    try:
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def _pydicom():
    """pydicom, or a CaseError saying how to have it (the FLARE image leaves the DICOM path's packages out)."""
    try:
        import pydicom
    except ImportError:
        raise CaseError("DICOM input needs pydicom and highdicom: pip install pydicom highdicom") from None
    return pydicom


def _header(path: Path):
    return _pydicom().dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "unknown"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under `folder` (any depth; hidden entries left out), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def find_series(folder: Path) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """Every series under `folder` (any depth, any file order), each checked (check_series: one that is no CT
    volume is `skipped`, one that is a faulty volume carries its `problem`), sorted by case id; and the DICOM files
    that could not be read, with why. Nothing (and no pydicom needed) where there is no DICOM file."""
    paths = dicom_files(folder)
    if not paths:
        return [], []
    _pydicom()
    groups: dict[str, list[tuple[Path, object]]] = {}
    unreadable: list[tuple[Path, str]] = []
    for path in paths:
        try:
            header = _header(path)
        except Exception as err:  # pydicom raises many kinds on a damaged file: each is one unreadable file
            unreadable.append((path, f"not a readable DICOM file ({type(err).__name__}: "
                                     f"{(str(err).splitlines() or [''])[0][:160]})"))
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid or not header.get("SOPClassUID"):  # pydicom reads a damaged file leniently: nothing in it
            unreadable.append((path, "not a readable DICOM file (no SOP Class or Series Instance UID)"))
            continue
        groups.setdefault(uid, []).append((path, header))
    series, taken = [], set()
    for uid, members in sorted(groups.items(), key=lambda item: str(item[1][0][0])):
        first = members[0][1]
        base = "_".join(_safe(str(first.get(key, "") or "unknown"))
                        for key in ("PatientID", "StudyDate", "SeriesNumber"))
        case_id, n = base, 1
        while case_id in taken:
            n += 1
            case_id = f"{base}_{n}"
        taken.add(case_id)
        series.append(check_series(DicomSeries(
            uid, case_id, tuple(path for path, _ in members), str(first.get("Modality", "")),
            str(first.get("SeriesDescription", "")), str(first.get("StudyInstanceUID", "")),
            str(first.get("FrameOfReferenceUID", ""))), [header for _, header in members]))
    return sorted(series, key=lambda s: s.case_id), unreadable


def series_of_file(path: Path) -> DicomSeries:
    """The series a single DICOM file belongs to, among the files of its folder; CaseError where the file cannot be
    read."""
    found, unreadable = find_series(path.parent)
    for other, reason in unreadable:
        if other == path:
            raise CaseError(f"{path}: {reason}")
    owner = next((s for s in found if path in s.files), None)
    if owner is None:
        raise CaseError(f"{path}: not a DICOM file of a series in {path.parent}")
    return owner


def _with(series: DicomSeries, problem: str | None = None, skipped: str | None = None,
          files: tuple[Path, ...] | None = None) -> DicomSeries:
    return DicomSeries(series.uid, series.case_id, files or series.files, series.modality, series.description,
                       series.study_uid, series.frame_of_reference_uid, problem, skipped)


def _image_types(header) -> list[str]:
    value = header.get("ImageType") or []
    return [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def check_series(series: DicomSeries, headers: list) -> DicomSeries:
    """The series with its files in slice order; or `skipped` with why it is no CT volume at all (another modality
    or SOP class, a scout series, a single image such as a dose report), for a line and no case; or with the one-line
    `problem` why it cannot be a correct 3D volume (a failed case)."""
    sop_classes = {str(h.get("SOPClassUID", "")) for h in headers}
    if series.modality != "CT":
        return _with(series, skipped=f"modality {series.modality or 'missing'}, not CT")
    if ENHANCED_CT_IMAGE_STORAGE in sop_classes:
        return _with(series, problem="a multi-frame (enhanced) CT object: only single-frame CT series are read")
    if sop_classes != {CT_IMAGE_STORAGE}:
        return _with(series, skipped=f"not CT images (SOP class {', '.join(sorted(sop_classes - {CT_IMAGE_STORAGE}))})")
    localizers = sum("LOCALIZER" in _image_types(h) for h in headers)
    if localizers == len(headers):
        return _with(series, skipped=f"a localizer (scout) series of {localizers} image(s)")
    if localizers:
        return _with(series, problem=f"{localizers} localizer (scout) image(s) among its {len(headers)} files")
    if len(headers) < 2:
        return _with(series, skipped="a single image, not a 3D volume")
    try:
        if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
            return _with(series, problem="multi-frame CT images: only single-frame CT series are read")
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        matrices = {(int(h.Rows), int(h.Columns), tuple(round(float(v), 6) for v in h.PixelSpacing)) for h in headers}
    except (AttributeError, TypeError, ValueError, KeyError) as err:
        return _with(series, problem=f"a slice without a usable position, orientation, matrix or pixel spacing "
                                     f"({type(err).__name__}: {err})")
    if len(matrices) > 1:
        return _with(series, problem=f"slices of {len(matrices)} different matrices or pixel spacings")
    rows, columns, pixel_spacing = next(iter(matrices))
    if min(rows, columns) < 1 or len(pixel_spacing) != 2 or min(pixel_spacing) <= 0 \
            or rows * columns * len(headers) > MAX_VOXELS:
        return _with(series, problem=f"{rows} x {columns} pixels of {pixel_spacing} mm, {len(headers)} slices: not a "
                                     "plausible CT grid")
    if orientations.shape[1] != 6 or np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        return _with(series, problem="slices of different orientations (ImageOrientationPatient)")
    row, column = orientations[0][:3], orientations[0][3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        return _with(series, problem="ImageOrientationPatient is not two orthogonal unit vectors")
    normal = np.cross(row, column)
    order = np.argsort(positions @ normal)
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    gaps = steps @ normal
    if np.min(np.abs(gaps)) < 1e-3:
        return _with(series, problem="two slices at the same position (a repeated or mixed series)")
    # A tilted gantry moves each slice along the table, not along the slice normal: the shear of the positions
    # against the normal is the tilt that matters (a GantryDetectorTilt tag on a series whose positions follow
    # the normal is a regular oblique grid, read as it is)
    sideways = np.linalg.norm(steps - np.outer(gaps, normal), axis=1)
    tilt = math.degrees(math.atan2(float(np.median(sideways)), float(np.median(gaps))))
    if abs(tilt) > TILT_TOLERANCE_DEG:
        return _with(series, problem=f"gantry tilt of {abs(tilt):.1f} degrees: not resampled here; send a "
                                     "reconstruction without tilt")
    median = float(np.median(gaps))
    if gaps.max() >= MISSING_GAP * median:
        at = int(np.argmax(gaps))
        missing = int(round(gaps.max() / median)) - 1
        return _with(series, problem=f"{missing} missing slice(s) after position {positions[at] @ normal:.2f} mm "
                                     f"along the slice normal ({gaps.max():.2f} mm gap, {median:.2f} mm elsewhere)")
    if np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
        return _with(series, problem=f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm (more than "
                                     f"{SPACING_TOLERANCE:.0%}): not one regular grid")
    numbers = sorted(int(h.get("InstanceNumber", 0) or 0) for h in headers)
    if numbers[0] > 0 and numbers[-1] - numbers[0] + 1 != len(headers):
        log.warning("warning: %s: instance numbers %d-%d for %d slices: part of the series may be elsewhere (the "
                    "volume read is the %d slices found)", series, numbers[0], numbers[-1], len(headers), len(headers))
    return _with(series, files=tuple(series.files[i] for i in order))


def read_series(series: DicomSeries) -> sitk.Image:
    """The series' voxels in HU (rescale slope and intercept applied by GDCM), its geometry from the files' positions
    and orientation, slice k = files[k]. CaseError (one line) for a refused series or one GDCM cannot read."""
    if series.problem is not None:
        raise CaseError(f"{series}: {series.problem}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(path) for path in series.files])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise CaseError(f"{series}: cannot be read ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1 or image.GetSize()[2] != len(
            series.files) or min(image.GetSpacing()) <= 0:
        raise CaseError(f"{series}: not read as one scalar 3D volume of its {len(series.files)} slices")
    return image
