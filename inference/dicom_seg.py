"""The lesion mask of a DICOM series as a DICOM Segmentation object (highdicom), for PACS and viewers.

One segment, "lesion" (SNOMED CT: category 49755003 Morphologically Abnormal Structure, type 52988006 Lesion), made
by an automatic algorithm (this engine and its version; family DCM 123110 Artificial Intelligence); BINARY (the lesion
probability, with --save-probabilities: FRACTIONAL, PROBABILITY, a second SEG under probabilities/);
referencing the source series (its Study, Series and SOP Instance UIDs and Frame of Reference): the SEG's frame k lies
on source slice k, with that slice's geometry exactly. Empty frames are left out, as highdicom does by default; a mask
with no lesion at all keeps its (empty) frames, so that "nothing found" is a SEG too.

SEG output needs DICOM input: the SEG refers to the source instances it segments. A NIfTI input has none, so
`--output-format dicom-seg` is refused for it before any case runs (cli.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import __version__
from .dicom_series import DicomSeries
from .errors import CaseError

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["SEG_SUFFIX", "read_seg_mask", "source_datasets", "write_seg"]

SEG_SUFFIX = ".dcm"
MANUFACTURER = "flare-lesion-inference"
SEG_SERIES_NUMBER = 9901


def source_datasets(series: DicomSeries) -> list:
    """The series' headers (no pixel data), in slice order."""
    import pydicom

    return [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]


def segmentation(mask: np.ndarray, series: DicomSeries, model_name: str, probability: bool = False,
                 sources: list | None = None):
    """The SEG dataset of `mask` ((z, y, x) 0/1, slice k = series.files[k]); with `probability`, `mask` is the lesion
    probability as uint8 round(p * 255) and the SEG is FRACTIONAL (PROBABILITY, 255 = 1.0), its stored values those
    bytes exactly. `sources`: the series' headers (source_datasets), where the caller has them already."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = sources or source_datasets(series)
    if mask.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise CaseError(f"{series}: the mask's {mask.shape} voxels are not the series' grid")
    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER, version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   source=model_name[:64] or None)
    lesion = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    pixels = mask.astype(np.float32) / 255 if probability else (mask > 0).astype(np.uint8)
    keep_all = not pixels.any()  # nothing found: the empty frames say so (a SEG needs a frame; highdicom drops them)
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL if probability else hd.seg.SegmentationTypeValues.BINARY
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=kind, segment_descriptions=[lesion],
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER + probability, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=model_name[:64] or MANUFACTURER,
        software_versions=__version__, device_serial_number="none", max_fractional_value=255,
        series_description="lesion probability" if probability else "lesion segmentation",
        omit_empty_frames=not keep_all)


def write_seg(mask: np.ndarray, series: DicomSeries, path: Path, model_name: str, probability: bool = False,
              sources: list | None = None) -> None:
    """Write the SEG of `mask` (or of the probability: segmentation) for `series` to `path` (the caller makes it
    atomic)."""
    segmentation(mask, series, model_name, probability, sources).save_as(str(path))


def read_seg_mask(path: Path, series: DicomSeries, sources: list | None = None) -> np.ndarray:
    """A SEG of `series` read back (highdicom) as a (z, y, x) array on the series' slices: bool for a BINARY SEG,
    uint8 round(p * 255) for a FRACTIONAL one; CaseError where it is not a SEG of this series (another study or frame
    of reference, or frames referencing other instances)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    if seg.StudyInstanceUID != series.study_uid or seg.FrameOfReferenceUID != series.frame_of_reference_uid:
        raise CaseError(f"{path}: not a SEG of {series}: another study or frame of reference")
    uids = [str(d.SOPInstanceUID) for d in sources or source_datasets(series)]
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    if not referenced <= set(uids):
        raise CaseError(f"{path}: its frames reference instances that are not {series}'s")
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                               ignore_spatial_locations=False)[..., 0]
    if seg.SegmentationType == "FRACTIONAL":
        return np.round(pixels.astype(np.float64) * 255).astype(np.uint8)
    return pixels > 0
