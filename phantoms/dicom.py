"""A phantom (or any CT image) written as a DICOM CT series, the way a scanner's export lays it out: one file per
slice with the CT Image Storage SOP class, patient, study and series identity, ImagePositionPatient and
ImageOrientationPatient per slice, HU with RescaleSlope 1 and RescaleIntercept -1024 (HU below -1024 are stored as -1024).
SimpleITK's GDCM writer writes the files. For tests and the DICOM demo: what a hospital sends, made from a phantom.

Faults a real export may have can be asked for: a gantry tilt (slices sheared along the table), a missing slice, files
written in shuffled order or into subfolders.
"""
from __future__ import annotations

import locale
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
INTERCEPT = -1024


def write_ct_series(image: sitk.Image, folder: str | Path, patient_id: str = "PHANTOM", study_date: str = "20261207",
                    series_number: int = 1, study_uid: str | None = None, series_uid: str | None = None,
                    tilt_degrees: float = 0.0, missing_slice: int | None = None, shuffle_seed: int | None = None,
                    subfolders: int = 1, modality: str = "CT", image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
                    first_number: int = 0) -> list[Path]:
    """Write `image` (a 3D CT in HU, axial: identity-like direction) as one DICOM series into `folder`; the files,
    slice order. `tilt_degrees`: a gantry tilt (each slice's plane tilted about the x axis while the slices
    still advance along the table: the positions are sheared against the slice normal). `missing_slice`: that slice's file is not written. `shuffle_seed`: file names in a
    shuffled order. `subfolders`: the files spread over that many subfolders. `image_type`, `modality`: those tags
    (a LOCALIZER, an MR series). `first_number`: where the file numbers start (another series in the same folder)."""
    import pydicom.uid

    folder = Path(folder)
    study_uid = study_uid or pydicom.uid.generate_uid()
    series_uid = series_uid or pydicom.uid.generate_uid()
    frame_uid = pydicom.uid.generate_uid()
    # HU within what 12 stored bits hold above the intercept; GDCM stores value - intercept (the rescale tags below)
    hu = np.clip(sitk.GetArrayFromImage(image), INTERCEPT, INTERCEPT + 4095).astype(np.int16)
    spacing, direction = image.GetSpacing(), np.array(image.GetDirection()).reshape(3, 3)
    tilt = math.radians(tilt_degrees)
    row, column = direction[:, 0], direction[:, 1]
    if tilt:
        column = column * math.cos(tilt) + direction[:, 2] * math.sin(tilt)
    order = np.arange(hu.shape[0])
    names = np.random.default_rng(shuffle_seed).permutation(len(order)) if shuffle_seed is not None else order
    shared = {"0008|0016": CT_IMAGE_STORAGE, "0008|0060": modality, "0008|0008": image_type,
              "0010|0010": f"Phantom^{patient_id}", "0010|0020": patient_id, "0010|0030": "19700101",
              "0010|0040": "O", "0008|0020": study_date, "0008|0030": "120000", "0008|0050": "ACC0001",
              "0008|0090": "", "0020|0010": "1", "0020|000d": study_uid, "0020|000e": series_uid,
              "0020|0011": str(series_number), "0020|0052": frame_uid, "0008|103e": "phantom CT",
              "0008|0070": "flare-lesion-inference phantoms", "0018|0050": f"{spacing[2]:.4f}",
              "0018|1120": f"{tilt_degrees:.2f}", "0028|1052": str(INTERCEPT), "0028|1053": "1",
              "0028|1054": "HU", "0020|1040": "",
              "0020|0037": "\\".join(f"{v:.6f}" for v in (*row, *column))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    written = []
    # GDCM's writer sets the process's locale to "C" and leaves it so: text read from a subprocess afterwards
    # decodes as ASCII (seen in the test run); what it was is put back once the series is written
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        for k in order:
            if k == missing_slice:
                continue
            origin = np.array(image.TransformIndexToPhysicalPoint((0, 0, int(k))), float)
            plane = sitk.GetImageFromArray(hu[k][None])
            plane.SetSpacing((spacing[0], spacing[1], spacing[2]))
            for tag, value in {**shared, "0020|0013": str(k + 1), "0008|0018": pydicom.uid.generate_uid(),
                               "0020|0032": "\\".join(f"{v:.4f}" for v in origin)}.items():
                plane.SetMetaData(tag, value)
            part = f"part{names[k] % subfolders}" if subfolders > 1 else ""
            target = folder / part / f"IM{first_number + names[k]:05d}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            writer.SetFileName(str(target))
            writer.Execute(plane)
            written.append(target)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return written


def main(argv=None) -> int:
    """`python -m phantoms.dicom IMAGE FOLDER [--patient-id ID]`: write an image (a phantom's) as a DICOM CT series."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m phantoms.dicom", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("image", help="a CT image in HU (NIfTI, MHA, NRRD)")
    parser.add_argument("folder", help="the folder for the series' files")
    parser.add_argument("--patient-id", default="PHANTOM")
    parser.add_argument("--series-number", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        files = write_ct_series(sitk.ReadImage(args.image), args.folder, patient_id=args.patient_id,
                                series_number=args.series_number)
    except (RuntimeError, OSError) as err:
        print(f"phantoms.dicom: {args.image}: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"phantoms.dicom: wrote {len(files)} slices to {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
