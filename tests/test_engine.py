"""The whole engine on small synthetic CTs: geometry, values, CLI behaviour, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_ct_image, make_toy_model
from inference import PredictionSettings, load_model, predict_image, predict_image_with_report
from inference.backends import TorchNetwork

REPO = Path(__file__).resolve().parent.parent
THRESHOLD_HU = 100.0


class IntensityThreshold(torch.nn.Module):
    """Lesion logit grows with intensity: the ideal mask is `CT > THRESHOLD_HU` voxel by voxel."""

    def __init__(self, threshold_normalised: float):
        super().__init__()
        self.threshold = threshold_normalised

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), (x - self.threshold) * 10], dim=1)


def threshold_model(model_dir: Path, spacing=(3.0, 3.0, 3.0)):
    model = load_model(model_dir, device="cpu")
    props = model.config.intensity_properties
    model.networks = [TorchNetwork(IntensityThreshold((THRESHOLD_HU - props["mean"]) / props["std"]),
                                   torch.device("cpu"))]
    model.config.spacing = spacing
    return model


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


OBLIQUE = sitk.VersorTransform((1, 2, 3), 0.4).GetMatrix()
GEOMETRIES = {
    "lps_identity": dict(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing_xyz=(1.5, 1.5, 4.0)),
    "ras_flipped": dict(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), spacing_xyz=(1.5, 1.5, 4.0)),
    "z_flipped": dict(direction=(1, 0, 0, 0, 1, 0, 0, 0, -1), spacing_xyz=(1.5, 1.5, 4.0)),
    "oblique": dict(direction=OBLIQUE, spacing_xyz=(1.5, 1.5, 4.0)),
    "anisotropic_0.7x0.7x5": dict(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing_xyz=(0.7, 0.7, 5.0)),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_output_geometry_is_the_input_geometry(name, toy_model_dir):
    image = make_ct_image(shape_zyx=(20, 48, 56), origin=(-100.5, 33.25, 7.0), **GEOMETRIES[name])
    mask = predict_image(image, load_model(toy_model_dir, device="cpu"))
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_mask_lands_on_the_right_voxels(name, toy_model_dir):
    """With an intensity-threshold 'network', the mask must reproduce CT > 100 HU where it lies."""
    geometry = GEOMETRIES[name]
    image = make_ct_image(shape_zyx=(20, 48, 56), **geometry)
    model_spacing = tuple(geometry["spacing_xyz"][::-1])
    mask = predict_image(image, threshold_model(toy_model_dir, model_spacing))
    expected = sitk.GetArrayFromImage(image) > THRESHOLD_HU
    predicted = sitk.GetArrayFromImage(mask).astype(bool)
    assert expected.sum() > 100
    assert np.array_equal(predicted, expected)  # model spacing == image spacing: no resampling


def test_mask_survives_resampling_to_a_coarser_model_spacing(toy_model_dir):
    image = make_ct_image(shape_zyx=(24, 64, 64), spacing_xyz=(0.8, 0.8, 2.5))
    mask = predict_image(image, threshold_model(toy_model_dir, (3.0, 3.0, 3.0)))
    expected = sitk.GetArrayFromImage(image) > THRESHOLD_HU
    assert dice(sitk.GetArrayFromImage(mask).astype(bool), expected) > 0.85


@pytest.mark.parametrize("method", ["logits", "labels"])
def test_resample_back_methods_agree(toy_model_dir, method):
    image = make_ct_image(shape_zyx=(24, 64, 64), spacing_xyz=(0.8, 0.8, 2.5))
    settings = PredictionSettings(resample_back=method)
    mask = predict_image(image, threshold_model(toy_model_dir, (3.0, 3.0, 3.0)), settings)
    assert dice(sitk.GetArrayFromImage(mask).astype(bool), sitk.GetArrayFromImage(image) > THRESHOLD_HU) > 0.8


def test_crop_does_not_change_the_mask_inside_the_body(toy_model_dir):
    image = make_ct_image(shape_zyx=(20, 48, 56), spacing_xyz=(3.0, 3.0, 3.0))
    model = threshold_model(toy_model_dir)
    cropped = sitk.GetArrayFromImage(predict_image(image, model, PredictionSettings(crop="exact")))
    full = sitk.GetArrayFromImage(predict_image(image, model, PredictionSettings(crop="none")))
    assert np.array_equal(cropped, full)


def test_the_case_report_has_every_stage_the_patch_and_the_step(toy_model_dir):
    _, report = predict_image_with_report(make_ct_image(), load_model(toy_model_dir, device="cpu"))
    assert {"crop", "resample", "network", "export"} <= set(report.seconds)
    assert all(report.seconds[k] >= 0 for k in ("crop", "resample", "network", "export"))
    assert all(report.spans[k][0] <= report.spans[k][1] for k in ("crop", "resample", "network", "export"))
    assert report.patch_size == (32, 32, 32)  # training patch, volume too small to enlarge
    assert report.step_size == 0.5 and report.predicted_gpu_peak_mb is None and report.lesions_dropped is None
    entry = report.as_dict()
    assert entry["patch_size"] == [32, 32, 32] and entry["network"] == report.seconds["network"]
    assert "predicted_gpu_peak_mb" not in entry and set(entry["at"]) == set(report.spans)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "inference", *map(str, args), "--quiet"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_predicts_every_case_and_survives_a_bad_one(tmp_path, toy_model_dir):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    sitk.WriteImage(make_ct_image(seed=1), str(inputs / "good_0000.nii.gz"))
    sitk.WriteImage(make_ct_image(seed=2), str(inputs / "also_good_0000.mha"))
    (inputs / "broken_0000.nii.gz").write_bytes(b"this is not a nifti file")
    timings = tmp_path / "timings.json"
    result = run_cli("-i", inputs, "-o", outputs, "-m", toy_model_dir, "--device", "cpu",
                     "--timings", timings)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 2  # the broken case, then the summary
    assert "broken_0000.nii.gz" in errors[0] and "cannot read image" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["also_good.nii.gz", "good.nii.gz"]
    report = json.loads(timings.read_text())
    stages = report["cases"]["good_0000.nii.gz"]
    assert {"read", "crop", "resample", "network", "export", "write", "total"} <= set(stages)
    assert "error" in report["cases"]["broken_0000.nii.gz"]


def test_cli_bad_model_folder_is_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    sitk.WriteImage(make_ct_image(shape_zyx=(8, 16, 16)), str(tmp_path / "in" / "case_0000.nii.gz"))
    result = run_cli("-i", tmp_path / "in", "-o", tmp_path / "out", "-m", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "model folder not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_step_size_patch_size_and_folds(tmp_path):
    model_dir = make_toy_model(tmp_path / "model", folds=(0, 1))
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(make_ct_image(shape_zyx=(30, 60, 60)), str(inputs / "c_0000.nii.gz"))
    timings = tmp_path / "t.json"
    result = run_cli("-i", inputs, "-o", tmp_path / "out", "-m", model_dir, "-f", "0", "1",
                     "-step_size", "0.75", "--patch-size", "16", "16", "16", "--timings", timings)
    assert result.returncode == 0, result.stderr
    report = json.loads(timings.read_text())
    assert report["folds"] == ["0", "1"]
    assert report["cases"]["c_0000.nii.gz"]["patch_size"] == [16, 16, 16]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused_intact_one_is_read(tmp_path, suffix):
    from inference.errors import CaseError
    from inference.io import read_image
    good = tmp_path / f"good{suffix}"
    sitk.WriteImage(make_ct_image(), str(good))
    assert read_image(good).GetSize() == (48, 40, 24)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    with pytest.raises(CaseError, match="truncated or corrupt"):
        read_image(cut)


def test_written_mask_is_world_readable(tmp_path):
    from inference.io import write_image_atomically
    target = tmp_path / "m.nii.gz"
    write_image_atomically(make_ct_image(), target)
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]


def test_logs_have_no_progress_bars_when_not_on_a_terminal_and_bars_on_one(tmp_path, toy_model_dir):
    import fcntl
    import os
    import pty
    import struct
    import termios
    for name in ("a", "b"):
        sitk.WriteImage(make_ct_image(shape_zyx=(12, 32, 32)), str(tmp_path / f"{name}_0000.nii.gz"))
    argv = [sys.executable, "-m", "inference", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m",
            str(toy_model_dir), "--device", "cpu", "--backend", "torch", "--verbose"]
    piped = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "\x1b[" not in piped.stderr
    lines = piped.stderr.splitlines()
    assert len(lines) == 4 and lines[0].startswith("model ") and lines[1].startswith("uncalibrated: ")
    assert lines[2].startswith("a: ")  # one line a case
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a width
    on_terminal = subprocess.run(argv[:6] + [str(tmp_path / "out2")] + argv[7:], cwd=REPO, stdout=follower,
                                 stderr=follower, timeout=300)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert on_terminal.returncode == 0
    assert b"cases:" in seen and b"windows:" in seen and b"\r" in seen  # the bars, on a terminal only
    quiet = subprocess.run(argv + ["--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""  # warnings and errors only: there are none
