"""DICOM CT series as cases: found in a folder (files in any order, in subfolders or mixed, grouped by
SeriesInstanceUID), checked to be one correct 3D volume, and read with SimpleITK/GDCM (geometry from
ImagePositionPatient and ImageOrientationPatient, the rescale slope and intercept applied).

A series that cannot be a correct volume is refused in one line naming it: not CT, a localizer among its slices,
mixed orientations or matrices, a gantry tilt (never resampled silently: TotalSegmentator and dcm2niix resample a
tilt, which moves every voxel; a tilted series is refused here with the angle, for the sender to reconstruct it
untilted), slices at non-uniform spacing beyond SPACING_TOLERANCE, missing or repeated slices.

pydicom reads the headers (no pixel data) to find and check the series; SimpleITK reads the voxels of exactly the
files found, in the order of their positions along the slice normal.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import CaseError

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
    problem: str | None = field(default=None)  # why it cannot be a volume, where it cannot (check_series)

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
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.") or "unknown"


def find_series(folder: Path) -> tuple[list[DicomSeries], list[tuple[Path, str]]]:
    """Every series under `folder` (any depth, any file order), each checked (check_series: a refused one carries
    its `problem`), sorted by case id; and the DICOM files that could not be read, with why."""
    pydicom = _pydicom()

    groups: dict[str, list[tuple[Path, object]]] = {}
    unreadable: list[tuple[Path, str]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if not is_dicom_file(path):
            continue
        try:
            header = _header(path)
        except (OSError, pydicom.errors.InvalidDicomError, ValueError) as err:
            unreadable.append((path, f"not a readable DICOM file ({str(err).splitlines()[0]})"))
            continue
        uid = str(header.get("SeriesInstanceUID", "")) or f"no-series-uid:{path}"
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
    """The series a single DICOM file belongs to, among the files of its folder."""
    uid = str(_header(path).get("SeriesInstanceUID", ""))
    found, _ = find_series(path.parent)
    return next(s for s in found if s.uid == uid or path in s.files)


def _refused(series: DicomSeries, problem: str) -> DicomSeries:
    return DicomSeries(series.uid, series.case_id, series.files, series.modality, series.description,
                       series.study_uid, series.frame_of_reference_uid, problem)


def check_series(series: DicomSeries, headers: list) -> DicomSeries:
    """The series with its files in slice order, or with the one-line reason it cannot be a correct 3D volume."""
    if series.modality != "CT":
        return _refused(series, f"modality {series.modality or 'missing'}, not CT")
    if any(str(h.get("SOPClassUID", "")) == ENHANCED_CT_IMAGE_STORAGE or int(h.get("NumberOfFrames", 1) or 1) > 1
           for h in headers):
        return _refused(series, "a multi-frame (enhanced) CT object: only single-frame CT series are read")
    localizers = [h for h in headers if "LOCALIZER" in [str(v).upper() for v in (h.get("ImageType") or [])]]
    if localizers:
        return _refused(series, f"{len(localizers)} localizer (scout) image(s) among its {len(headers)} files")
    if len(headers) < 2:
        return _refused(series, "a single slice: not a 3D volume")
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        matrices = {(int(h.Rows), int(h.Columns), tuple(round(float(v), 6) for v in h.PixelSpacing)) for h in headers}
    except (AttributeError, TypeError, ValueError) as err:
        return _refused(series, f"a slice without a usable position, orientation, matrix or pixel spacing ({err})")
    if len(matrices) > 1:
        return _refused(series, f"slices of {len(matrices)} different matrices or pixel spacings")
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        return _refused(series, "slices of different orientations (ImageOrientationPatient)")
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    order = np.argsort(positions @ normal)
    positions = positions[order]
    steps = np.diff(positions, axis=0)
    gaps = steps @ normal
    if np.min(np.abs(gaps)) < 1e-3:
        return _refused(series, "two slices at the same position (a repeated or mixed series)")
    # a tilted gantry moves each slice along the table, not along the slice normal
    sideways = np.linalg.norm(steps - np.outer(gaps, normal), axis=1)
    tilt = math.degrees(math.atan2(float(np.median(sideways)), float(np.median(gaps))))
    declared = max((abs(float(h.get("GantryDetectorTilt", 0) or 0)) for h in headers), default=0.0)
    if max(abs(tilt), declared) > TILT_TOLERANCE_DEG:
        return _refused(series, f"gantry tilt of {max(abs(tilt), declared):.1f} degrees: not resampled here; "
                                "send a reconstruction without tilt")
    median = float(np.median(gaps))
    if gaps.max() >= MISSING_GAP * median:
        at = int(np.argmax(gaps))
        missing = int(round(gaps.max() / median)) - 1
        return _refused(series, f"{missing} missing slice(s) after position {positions[at] @ normal:.2f} mm along "
                                f"the slice normal ({gaps.max():.2f} mm gap, {median:.2f} mm elsewhere)")
    if np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
        return _refused(series, f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm (more than "
                                f"{SPACING_TOLERANCE:.0%}): not one regular grid")
    return DicomSeries(series.uid, series.case_id, tuple(series.files[i] for i in order), series.modality,
                       series.description, series.study_uid, series.frame_of_reference_uid)


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
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{series}: not a scalar 3D volume")
    return image
