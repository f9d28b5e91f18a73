"""DICOM in, DICOM SEG out (inference/dicom_series.py, dicom_seg.py; phantoms/dicom.py writes the series): CT series
made from synthetic volumes with SimpleITK's DICOM writer (shuffled file order, subfolders, several series in one
folder, a tilted one, one with a slice missing, an MR series, a localizer among the slices), run through the CLI.
The NIfTI mask of a series is the mask of the same volume given as NIfTI, voxel for voxel; the SEG reads back (highdicom
and pydicom) into that mask on the same frames, and Debian's dciodvfy finds no error in it; a series that cannot be a
correct volume gets one line and the others still run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import make_ct_image, make_toy_model
from inference.dicom_series import find_series, read_series
from phantoms.dicom import write_ct_series

REPO = Path(__file__).resolve().parent.parent
SHAPE = (16, 40, 48)


def predict(*flags, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inference", *map(str, flags), "--device", "cpu", "--backend",
                           "torch"], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_toy_model(tmp_path_factory.mktemp("model") / "model", seed=3)  # marks ~7 % of these volumes


def volume(seed: int) -> sitk.Image:
    # HU within what the series stores (-1024 and up): the NIfTI twin holds exactly the series' voxels
    image = make_ct_image(shape_zyx=SHAPE, spacing_xyz=(1.5, 1.5, 4.0), seed=seed)
    return sitk.Clamp(image, lowerBound=-1024)


def test_a_series_is_read_whole_in_slice_order_whatever_the_file_order(tmp_path):
    image = volume(1)
    write_ct_series(image, tmp_path / "in", patient_id="P7", study_date="20250102", series_number=3,
                    shuffle_seed=5, subfolders=3)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    [series], unreadable = find_series(tmp_path / "in")
    assert series.problem is None and unreadable == [] and series.case_id == "P7_20250102_3"
    read = read_series(series)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert np.allclose(read.GetOrigin(), image.GetOrigin()) and np.allclose(read.GetSpacing(), image.GetSpacing())
    assert np.allclose(read.GetDirection(), image.GetDirection())


def write_mixed_folder(folder: Path) -> dict[str, sitk.Image]:
    """Two good series (one patient, two series numbers; shuffled and in subfolders), and the faulty ones."""
    good = {"P1_20260101_1": volume(1), "P1_20260101_2": volume(2)}
    write_ct_series(good["P1_20260101_1"], folder, "P1", "20260101", 1, shuffle_seed=1, subfolders=2)
    write_ct_series(good["P1_20260101_2"], folder, "P1", "20260101", 2, shuffle_seed=2, first_number=100)
    write_ct_series(volume(3), folder / "tilted", "P2", "20260101", 4, tilt_degrees=12.0)
    write_ct_series(volume(4), folder / "gap", "P3", "20260101", 5, missing_slice=7)
    write_ct_series(volume(5), folder / "mr", "P4", "20260101", 6, modality="MR")
    files = write_ct_series(volume(6), folder / "scout", "P5", "20260101", 7)
    scout = pydicom.dcmread(files[0])
    localizer = write_ct_series(volume(6)[:, :, :1], folder / "scout", "P5", "20260101", 7,
                                study_uid=scout.StudyInstanceUID, series_uid=scout.SeriesInstanceUID,
                                image_type="ORIGINAL\\PRIMARY\\LOCALIZER", first_number=500)
    assert len(localizer) == 1
    return good


def test_series_in_one_folder_are_cases_and_bad_ones_get_one_line_each(tmp_path, model):
    good = write_mixed_folder(tmp_path / "dicom")
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    for name, image in good.items():
        sitk.WriteImage(image, str(nifti / f"{name}_0000.nii.gz"))
    done = predict("-i", tmp_path / "dicom", "-o", tmp_path / "out", "-m", model)
    assert done.returncode == 1, done.stderr
    assert predict("-i", nifti, "-o", tmp_path / "out_nifti", "-m", model).returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["P1_20260101_1.nii.gz", "P1_20260101_2.nii.gz"]
    for name in good:
        from_dicom = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))
        from_nifti = sitk.ReadImage(str(tmp_path / "out_nifti" / f"{name}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(from_nifti))
        assert sitk.GetArrayFromImage(from_dicom).any()
        assert np.allclose(from_dicom.GetOrigin(), from_nifti.GetOrigin())
        assert np.allclose(from_dicom.GetDirection(), from_nifti.GetDirection())
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    expected = {"P2_20260101_4": "gantry tilt of 12.0 degrees", "P3_20260101_5": "1 missing slice(s)",
                "P5_20260101_7": "1 localizer (scout) image(s)"}
    for case, reason in expected.items():
        assert any(f"series {case} (" in line and reason in line for line in errors), (case, errors)
    assert "error: 3 of 5 case(s) failed" in done.stderr  # the MR series is no case: skipped, in a line of its own
    assert any(line.startswith("skipped: ") and "series P4_20260101_6 (" in line and "modality MR, not CT" in line
               for line in done.stderr.splitlines())


def run_dciodvfy(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        if os.environ.get("FLARE_REQUIRE_DCIODVFY") == "1":
            pytest.fail("dciodvfy not found (FLARE_REQUIRE_DCIODVFY=1): scripts/setup.sh installs dicom3tools")
        pytest.skip("dciodvfy not found: apt-get install dicom3tools (scripts/setup.sh does, as root)")
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


def test_the_seg_reads_back_as_the_mask_on_the_source_frames_and_dciodvfy_finds_no_error(tmp_path, model):
    import highdicom as hd

    image = volume(8)
    files = write_ct_series(image, tmp_path / "in", "P9", "20260202", 11, shuffle_seed=3)
    assert predict("-i", tmp_path / "in", "-o", tmp_path / "nii", "-m", model).returncode == 0
    done = predict("-i", tmp_path / "in", "-o", tmp_path / "seg", "-m", model, "--output-format", "dicom-seg")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "seg").iterdir()] == ["P9_20260202_11.dcm"]
    path = tmp_path / "seg" / "P9_20260202_11.dcm"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nii" / "P9_20260202_11.nii.gz"))) > 0
    assert mask.any() and not mask.all()
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    ordered = sorted(sources.values(), key=lambda d: float(d.ImagePositionPatient[2]))
    seg = hd.seg.segread(str(path))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ordered[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == ordered[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ordered[0].SeriesInstanceUID
    described = seg.SegmentSequence[0]
    assert described.SegmentLabel == "lesion" and described.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in ordered], segment_numbers=[1])[..., 0]
    assert np.array_equal(pixels > 0, mask)
    # pydicom alone: each frame's source instance and plane position are the source slice's
    raw = pydicom.dcmread(path)
    frames = raw.pixel_array.reshape(-1, *mask.shape[1:])
    for frame, item in zip(frames, raw.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[uid].ImagePositionPatient])
        assert np.array_equal(frame > 0, mask[ordered.index(sources[uid])])
    assert run_dciodvfy(path) == []


def test_one_file_or_one_series_folder_is_an_input_and_seg_needs_dicom_input(tmp_path, model):
    files = write_ct_series(volume(9), tmp_path / "series", "P8", "20260303", 2)
    for source in (files[4], tmp_path / "series"):
        out = tmp_path / f"out_{source.name}"
        done = predict("-i", source, "-o", out, "-m", model)
        assert done.returncode == 0, done.stderr
        assert [p.name for p in out.iterdir()] == ["P8_20260303_2.nii.gz"]
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    sitk.WriteImage(volume(9), str(nifti / "a_0000.nii.gz"))
    refused = predict("-i", nifti, "-o", tmp_path / "x", "-m", model, "--output-format", "dicom-seg")
    assert refused.returncode == 2 and "--output-format dicom-seg needs DICOM series as input" in refused.stderr
    assert not (tmp_path / "x").exists()
    refused = predict("-i", tmp_path / "series", "-o", tmp_path / "y", "-m", model, "--skip-existing")
    assert refused.returncode == 2 and "--skip-existing is not supported for DICOM input yet" in refused.stderr


def test_series_that_are_no_ct_volume_are_skipped_and_a_damaged_file_is_named(tmp_path, model):
    """What a study's folder routinely holds beside its CT: a scout series, a single image (a dose report), a damaged
    file; each gets a line and no case, the CT series runs, the exit code is 0."""
    write_ct_series(volume(1), tmp_path / "study" / "ct", "P6", "20260404", 2)
    write_ct_series(volume(2)[:, :, :2], tmp_path / "study" / "scout", "P6", "20260404", 1,
                    image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    write_ct_series(volume(3)[:, :, :1], tmp_path / "study" / "dose", "P6", "20260404", 99)
    (tmp_path / "study" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    done = predict("-i", tmp_path / "study", "-o", tmp_path / "out", "-m", model)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["P6_20260404_2.nii.gz"]
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped: ")]
    assert any("P6_20260404_1" in line and "a localizer (scout) series of 2 image(s)" in line for line in skipped)
    assert any("P6_20260404_99" in line and "a single image, not a 3D volume" in line for line in skipped)
    assert any("broken.dcm: not a readable DICOM file" in line for line in skipped), skipped
    for flag in (["--on-error", "empty"], ["--ray"]):
        refused = predict("-i", tmp_path / "study" / "ct", "-o", tmp_path / "x", "-m", model, *flag)
        assert refused.returncode == 2 and "is not supported for DICOM input yet" in refused.stderr, refused.stderr


def test_a_folder_without_dicom_needs_no_dicom_library(tmp_path):
    """The FLARE image has no pydicom: a folder without a case must still say so, not ask for pydicom."""
    (tmp_path / "empty").mkdir()
    probe = subprocess.run([sys.executable, "-c", "import sys; from inference import io\ntry:\n io.find_cases(sys.argv[1])"
                            "\nexcept io.CaseError as e:\n print(e)\nprint('pydicom' in sys.modules)",
                            str(tmp_path / "empty")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.stdout.splitlines() == [f"{tmp_path / 'empty'}: no case in it (no .nii.gz, .nii, .mha, .nrrd file and "
                                         "no DICOM series)", "False"], probe.stdout + probe.stderr


def test_probabilities_of_a_series_are_a_fractional_seg_with_the_nifti_probabilitys_bytes(tmp_path, model):
    import highdicom as hd

    write_ct_series(volume(8), tmp_path / "in", "P9", "20260202", 11, shuffle_seed=4)
    for fmt in ("nifti", "dicom-seg"):
        done = predict("-i", tmp_path / "in", "-o", tmp_path / fmt, "-m", model, "--output-format", fmt,
                       "--save-probabilities")
        assert done.returncode == 0, done.stderr
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nifti" / "probabilities" /
                                                            "P9_20260202_11.nii.gz")))
    path = tmp_path / "dicom-seg" / "probabilities" / "P9_20260202_11.dcm"
    seg = hd.seg.segread(str(path))
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    [series], _ = find_series(tmp_path / "in")
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in series.files]
    stored = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], rescale_fractional=False)[..., 0]
    assert probability.any() and np.array_equal(stored, probability)
    assert (tmp_path / "dicom-seg" / "P9_20260202_11.dcm").is_file()
    assert run_dciodvfy(path) == []
