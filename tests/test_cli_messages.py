"""What a newcomer meets in the first minutes: one image as input, commands that name themselves as they were started,
a mistyped flag answered with the flag meant, a parent folder given as the model answered with the model folders in
it, and `--backend onnx` without an export answered with where one is or how to make one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct_image, make_toy_model

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def predict(*flags, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inference", *map(str, flags)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_one_image_as_input_is_the_case_a_folder_of_it_would_be(tmp_path):
    model = make_toy_model(tmp_path / "model", seed=2)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(make_ct_image(seed=4), str(tmp_path / "in" / "lung_7_0000.nii.gz"))
    sitk.WriteImage(make_ct_image(seed=4), str(tmp_path / "plain.nii.gz"))
    for source, out in ((tmp_path / "in", "folder"), (tmp_path / "in" / "lung_7_0000.nii.gz", "file"),
                        (tmp_path / "plain.nii.gz", "plain")):
        done = predict("-i", source, "-o", tmp_path / out, "-m", model, "--device", "cpu", "--backend", "torch")
        assert done.returncode == 0, done.stderr
    names = {out: sorted(p.name for p in (tmp_path / out).iterdir()) for out in ("folder", "file", "plain")}
    assert names == {"folder": ["lung_7.nii.gz"], "file": ["lung_7.nii.gz"], "plain": ["plain.nii.gz"]}
    folder = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "folder" / "lung_7.nii.gz")))
    for out, name in (("file", "lung_7"), ("plain", "plain")):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / out / f"{name}.nii.gz"))), folder)
    (tmp_path / "notes.txt").write_text("not an image")
    done = predict("-i", tmp_path / "notes.txt", "-o", tmp_path / "x", "-m", model)
    assert done.returncode == 2 and "notes.txt: not an image" in done.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("script, module", [("flare-predict", "inference"), ("flare-metrics", "evaluation.run_metrics"),
                                            ("flare-efficiency", "evaluation.run_efficiency"),
                                            ("flare-phantoms", "phantoms")])
def test_each_command_names_itself_as_it_was_started(script, module):
    if not (VENV_BIN / script).exists():
        pytest.skip(f"{VENV_BIN / script}: not installed (scripts/setup.sh installs the project's commands)")
    installed = subprocess.run([str(VENV_BIN / script), "--help"], capture_output=True, text=True, timeout=120)
    as_module = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
    assert installed.returncode == as_module.returncode == 0
    assert installed.stdout.startswith(f"usage: {script} ") and as_module.stdout.startswith(f"usage: python -m {module} ")


def test_a_mistyped_flag_gets_the_flag_meant_in_one_line(tmp_path):
    done = predict("-i", tmp_path, "-o", tmp_path / "out", "--step-sise", "0.5", timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unrecognized arguments: --step-sise 0.5; did you mean --step-size?" in done.stderr
    done = predict("-i", tmp_path, "-o", tmp_path / "out", "--frobnicate", timeout=120)
    assert done.returncode == 2 and "did you mean" not in done.stderr and "--frobnicate" in done.stderr


def test_a_parent_folder_as_the_model_lists_the_model_folders_in_it(tmp_path):
    make_toy_model(tmp_path / "models" / "liver")
    make_toy_model(tmp_path / "models" / "nnUNet_results" / "Dataset1_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    (tmp_path / "in").mkdir()
    sitk.WriteImage(make_ct_image(), str(tmp_path / "in" / "a_0000.nii.gz"))
    done = predict("-i", tmp_path / "in", "-o", tmp_path / "out", "-m", tmp_path / "models", timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    models = tmp_path / "models"
    assert (f"{models}: not an nnU-Net model folder (no plans.json); model folders below it: {models / 'liver'}, "
            f"{models / 'nnUNet_results' / 'Dataset1_X' / 'nnUNetTrainer__nnUNetPlans__3d_fullres'}") in done.stderr


def test_backend_onnx_without_an_export_says_where_the_cached_one_is(tmp_path):
    model = make_toy_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    sitk.WriteImage(make_ct_image(), str(tmp_path / "in" / "a_0000.nii.gz"))
    env = {"FLARE_CACHE_DIR": str(tmp_path / "cache")}
    run = (lambda *flags: subprocess.run([sys.executable, "-m", "inference", "-i", str(tmp_path / "in"), "-m",
                                          str(model), "--device", "cpu", *flags], cwd=REPO, capture_output=True,
                                         text=True, timeout=300, env={**os.environ, **env}))
    refused = run("-o", str(tmp_path / "o1"), "--backend", "onnx")
    assert refused.returncode == 2 and "export the model first with `python -m inference.export_onnx" in refused.stderr
    assert "this machine's CPU export" not in refused.stderr
    assert run("-o", str(tmp_path / "o2"), "--backend", "auto").returncode == 0  # makes the cached export
    refused = run("-o", str(tmp_path / "o3"), "--backend", "onnx")
    assert refused.returncode == 2 and "this machine's CPU export of the same checkpoint is " in refused.stderr
    assert str(tmp_path / "cache" / "onnx") in refused.stderr


def test_the_run_report_holds_what_an_audit_needs(tmp_path):
    """--report (and --timings, the same content): the engine's version and commit, the versions of what computed,
    the device, the settings used after the calibration, the model's fingerprint, and each case's input, output,
    status, error and stage times; written atomically where asked, checked writable before any work."""
    import json

    import inference
    from inference import load_model

    model = make_toy_model(tmp_path / "model", seed=6)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(make_ct_image(seed=1), str(tmp_path / "in" / "good_0000.nii.gz"))
    (tmp_path / "in" / "bad_0000.nii.gz").write_bytes(b"not a nifti")
    done = predict("-i", tmp_path / "in", "-o", tmp_path / "out", "-m", model, "--device", "cpu", "--backend",
                   "torch", "--step-size", "0.6", "--report", tmp_path / "run.json", "--timings", tmp_path / "t.json")
    assert done.returncode == 1, done.stderr
    report = json.loads((tmp_path / "run.json").read_text())
    assert report == json.loads((tmp_path / "t.json").read_text())
    environment = report["environment"]
    assert environment["engine"] == inference.__version__ and environment["torch"].startswith("2.")
    assert environment["simpleitk"] and environment["device_name"] and environment["cuda"] is None
    assert environment["commit"] is None or len(environment["commit"].split("+")[0]) == 40
    assert report["settings"]["step_size"] == 0.6 and report["settings"]["crop"] == "exact"
    assert report["calibration"].startswith("uncalibrated: ")
    assert report["model_fingerprint"] == load_model(model, device="cpu").fingerprint()
    good, bad = report["cases"]["good_0000.nii.gz"], report["cases"]["bad_0000.nii.gz"]
    assert good["status"] == "ok" and good["output"] == str(tmp_path / "out" / "good.nii.gz")
    assert good["input"] == str(tmp_path / "in" / "good_0000.nii.gz") and good["network"] > 0 and good["windows"] >= 1
    assert bad["status"] == "failed" and bad["output"] is None and "bad_0000.nii.gz" in bad["error"]
    refused = predict("-i", tmp_path / "in", "-o", tmp_path / "o2", "-m", model, "--report", tmp_path / "no" / "r.json")
    assert refused.returncode == 2 and "--report: the folder" in refused.stderr and not (tmp_path / "o2").exists()


def test_saved_probabilities_are_the_softmax_beside_the_masks_folder(tmp_path):
    """--save-probabilities: OUTPUT/probabilities/<case>.nii.gz, uint8 round(p x 255) on the input's grid, where
    p is the softmax of the logits; > 127 exactly where the mask is 1 (two classes: the mask is p > 0.5, up to the
    rounding at p = 0.5), 0 outside the body box; not among the masks a scorer lists; refused with SEG output."""
    from inference import PredictionSettings, load_model
    from inference.pipeline import crop_box, predict_image_with_probability

    model_dir = make_toy_model(tmp_path / "model", seed=3)  # marks ~7 % of the volume
    image = make_ct_image(seed=2)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(image, str(tmp_path / "in" / "c_0000.nii.gz"))
    done = predict("-i", tmp_path / "in", "-o", tmp_path / "out", "-m", model_dir, "--device", "cpu", "--backend",
                   "torch", "--save-probabilities")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["c.nii.gz"]
    written = sitk.ReadImage(str(tmp_path / "out" / "probabilities" / "c.nii.gz"))
    assert written.GetPixelID() == sitk.sitkUInt8 and written.GetSize() == image.GetSize()
    assert np.allclose(written.GetOrigin(), image.GetOrigin()) and np.allclose(written.GetSpacing(), image.GetSpacing())
    probability = sitk.GetArrayFromImage(written)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "c.nii.gz"))).astype(bool)
    assert mask.any() and 0 < probability.max() <= 255 and len(np.unique(probability)) > 10
    disagree = (probability > 127) != mask
    assert disagree.sum() <= 0.001 * mask.size  # only voxels at p = 0.5 +- the rounding
    model = load_model(model_dir, device="cpu")
    _, in_memory, _ = predict_image_with_probability(image, model, PredictionSettings())
    assert np.array_equal(sitk.GetArrayFromImage(in_memory), probability)
    box = crop_box(sitk.GetArrayFromImage(image), tuple(image.GetSpacing())[::-1], PredictionSettings())
    outside = np.ones(probability.shape, bool)
    outside[box] = False
    assert not probability[outside].any()
