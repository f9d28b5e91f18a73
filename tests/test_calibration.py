"""Per-model calibration of the speed settings (inference/calibrate.py, model/calibration.py,
network_plan.calibrated_settings): the record is read as untrusted data, the rule picks the reference where a faster
candidate loses accuracy, the chosen settings are the default of the CLI and the API, flags win, and a folder without
a record (or with one made for other weights) runs nnU-Net's tiling, saying so."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_ct_image, make_toy_model
from inference import ModelError, PredictionSettings, load_model, predict_image_with_report
from inference.backends import TorchNetwork
from inference.calibrate import REFERENCE, Candidate, choose
from inference.calibrate import main as calibrate_main
from inference.model.calibration import CALIBRATION_FILE, read_calibration, recorded_precision
from inference.network_plan import calibrated_settings, settings_from_record

REPO = Path(__file__).resolve().parent.parent
SHAPE = (40, 96, 96)  # 53 x 48 x 48 voxels at the toy model's 3 mm: room for patches of 32 (x1.0), 40 (x1.2), 48 (x1.5)
PATCH = {1.0: [32, 32, 32], 1.2: [40, 40, 40], 1.5: [48, 48, 48]}


def record(model_dir: Path, fingerprint: str, patch_scale=1.2, step_size=0.5, backend="auto", crop=None) -> None:
    chosen = {"patch_scale": patch_scale, "step_size": step_size, "backend": backend}
    (model_dir / CALIBRATION_FILE).write_text(json.dumps({
        "chosen": chosen if crop is None else {**chosen, "crop": crop}, "model_fingerprint": fingerprint}))


def candidate(scale, step, backend, crop="exact", *, seconds, dsc):
    return Candidate(scale, step, backend, crop, seconds=list(seconds), agreement=[1.0] * len(dsc),
                     lesion_dsc=list(dsc))


def test_the_rule_keeps_the_reference_where_a_faster_candidate_loses_accuracy():
    reference = candidate(*REFERENCE, seconds=[10, 10], dsc=[0.80, 0.60])
    losing = candidate(1.5, 0.5, "auto", seconds=[2, 2], dsc=[0.79, 0.59])  # mean -0.01 > 0.005
    one_case = candidate(1.2, 0.75, "auto", seconds=[3, 3], dsc=[0.86, 0.54])  # mean +0.0, one case -0.06
    assert choose([reference, losing, one_case], 0.005, 0.05) is reference
    assert not losing.qualifies and not one_case.qualifies and reference.qualifies
    assert json.loads(json.dumps([c.summary() for c in (reference, losing, one_case)]))[1]["qualifies"] is False
    close = candidate(1.2, 0.5, "auto", seconds=[5, 5], dsc=[0.798, 0.596])  # mean -0.003, each within 0.05
    assert choose([reference, losing, close], 0.005, 0.05) is close
    box = candidate(1.2, 0.5, "auto", "box", seconds=[4, 4], dsc=[0.80, 0.52])  # the box crop loses a case
    assert choose([reference, close, box], 0.005, 0.05) is close and not box.qualifies
    without_labels = [Candidate(*REFERENCE, seconds=[4], agreement=[1.0]),
                      Candidate(1.5, 0.5, "auto", "exact", seconds=[1], agreement=[0.94]),
                      Candidate(1.2, 0.5, "auto", "box", seconds=[2], agreement=[0.995])]
    assert choose(without_labels, 0.005, 0.05) is without_labels[2]


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "not a valid calibration record"),
    ('{"chosen": {"patch_scale": 1.2, "step_size": 0.5, "backend": "auto"}}', "not a valid calibration record"),
    ('{"chosen": {"patch_scale": 0.5, "step_size": 0.5, "backend": "auto"}, "model_fingerprint": "x"}',
     "patch_scale must be in \\[1, 8\\]"),
    ('{"chosen": {"patch_scale": 1.2, "step_size": 0.5, "backend": "os.system"}, "model_fingerprint": "x"}',
     "backend one of auto, torch"),
    ('{"chosen": {"patch_scale": 1.2, "step_size": 0.5, "backend": "auto", "crop": false}, "model_fingerprint": "x"}',
     "crop one of exact, box, none"),
])
def test_a_record_that_is_not_valid_is_refused_in_one_line(tmp_path, text, problem):
    (tmp_path / CALIBRATION_FILE).write_text(text)
    with pytest.raises(ModelError, match=problem) as refused:
        read_calibration(tmp_path)
    assert "\n" not in str(refused.value) and str(tmp_path / CALIBRATION_FILE) in str(refused.value)
    assert read_calibration(tmp_path / "nowhere") is None


def test_a_record_is_used_for_its_own_model_only_and_flags_win(tmp_path):
    model_dir = make_toy_model(tmp_path / "model")
    settings, line = calibrated_settings(load_model(model_dir, device="cpu"))
    assert settings == PredictionSettings() and settings.patch_scale == 1.0 and line.startswith("uncalibrated: ")
    record(model_dir, load_model(model_dir, device="cpu").fingerprint(), patch_scale=1.5, step_size=0.75)
    model = load_model(model_dir, device="cpu")
    settings, line = calibrated_settings(model)
    assert (settings.patch_scale, settings.step_size) == (1.5, 0.75) and line.startswith("calibrated (")
    settings, line = calibrated_settings(model, patch_scale=1.0, tta=True)
    assert (settings.patch_scale, settings.step_size, settings.tta) == (1.0, 0.75, True)
    assert "(patch_scale set by a flag)" in line
    _, report = predict_image_with_report(make_ct_image(shape_zyx=SHAPE), model)  # the API's default: the record's
    assert list(report.patch_size) == PATCH[1.5] and report.step_size == 0.75
    record(model_dir, "another model's fingerprint", patch_scale=1.5)
    settings, line = calibrated_settings(load_model(model_dir, device="cpu"))
    assert settings.patch_scale == 1.0 and line.startswith("warning: ") and "not used" in line


def test_calibration_writes_its_record_and_the_command_line_runs_it(tmp_path, caplog):
    """The command end to end on two small cases with labels: every candidate measured, the record written with its
    evidence; the CLI then runs the chosen settings by default (said in a line) and a flag still wins."""
    model_dir = make_toy_model(tmp_path / "model", seed=5)
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for index in range(2):
        image = make_ct_image(shape_zyx=SHAPE, seed=index)
        sitk.WriteImage(image, str(images / f"case{index}_0000.nii.gz"))
        truth = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 300).astype(np.uint8))
        truth.CopyInformation(image)
        sitk.WriteImage(truth, str(labels / f"case{index}.nii.gz"))
    with caplog.at_level(logging.INFO, logger="inference"):
        assert calibrate_main(["-m", str(model_dir), "--images", str(images), "--labels", str(labels)]) == 0
    stored = json.loads((model_dir / CALIBRATION_FILE).read_text())
    assert list(stored) == ["records"] and list(stored["records"]) == ["cpu"]
    written = stored["records"]["cpu"]
    assert len(written["candidates"]) == 13 and written["cases"] == ["case0", "case1"]
    assert written["device"] == "cpu" and {c["precision"] for c in written["candidates"]} == {"fp32"}
    assert {c["patch_scale"]: c["inference_patch"] for c in written["candidates"]} == PATCH
    assert all(c["same_as"] is None for c in written["candidates"])  # x1.2 and x1.5 differ for this model
    assert {c["crop"] for c in written["candidates"]} == {"exact", "box"}
    assert written["first_run_export_seconds"] > 0
    key = ("patch_scale", "step_size", "backend", "crop")
    reference = written["candidates"][0]
    assert tuple(reference[k] for k in key) == REFERENCE
    assert reference["mean_agreement"] == 1.0 and reference["qualifies"]
    chosen = [c for c in written["candidates"] if tuple(c[k] for k in key) == tuple(written["chosen"][k] for k in key)]
    assert len(chosen) == 1 and chosen[0]["qualifies"]
    assert chosen[0]["seconds_per_case"] == min(c["seconds_per_case"] for c in written["candidates"] if c["qualifies"])
    assert written["model_fingerprint"] == load_model(model_dir, device="cpu").fingerprint()
    for flags, scale in (([], written["chosen"]["patch_scale"]), (["--patch-scale", "1.0"], 1.0)):
        out = tmp_path / f"out{len(flags)}"
        result = subprocess.run([sys.executable, "-m", "inference", "-i", images, "-o", out, "-m", model_dir,
                                 "--device", "cpu", "--timings", out.with_suffix(".json"), *flags],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"calibrated ({model_dir / CALIBRATION_FILE}): patch x{scale:g}" in result.stderr
        patch = json.loads(out.with_suffix(".json").read_text())["cases"]["case0_0000.nii.gz"]["patch_size"]
        assert patch == PATCH[scale]


def test_an_uncalibrated_folder_runs_nnunets_tiling_and_says_so(tmp_path):
    model_dir = make_toy_model(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(make_ct_image(), str(images / "case_0000.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "inference", "-i", images, "-o", tmp_path / "out", "-m", model_dir,
                             "--device", "cpu", "--timings", tmp_path / "t.json"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "uncalibrated: nnU-Net's tiling (the training patch, step 0.5, exact crop)" in result.stderr
    report = json.loads((tmp_path / "t.json").read_text())["cases"]["case_0000.nii.gz"]
    assert report["patch_size"] == [32, 32, 32] and report["step_size"] == 0.5


def test_a_recorded_box_crop_is_the_default_and_crop_flags_win(tmp_path):
    """A record choosing the box crop: the API and the CLI run it (a mask other than the exact crop's on this toy model,
    where the cut moves the windows), `--crop exact` and `--no-crop` win; an old record (no crop) means the exact crop;
    --no-crop with --crop box is refused in one line."""
    model_dir = make_toy_model(tmp_path / "model", seed=5)
    fingerprint = load_model(model_dir, device="cpu").fingerprint()
    record(model_dir, fingerprint, patch_scale=1.0)
    assert calibrated_settings(load_model(model_dir, device="cpu"))[0].crop == "exact"
    record(model_dir, fingerprint, patch_scale=1.0, crop="box")
    model = load_model(model_dir, device="cpu")
    settings, line = calibrated_settings(model)
    assert settings.crop == "box" and "box crop" in line
    assert calibrated_settings(model, crop="none")[0].crop == "none"
    image = make_ct_image(shape_zyx=SHAPE, seed=3)
    masks = {crop: sitk.GetArrayFromImage(predict_image_with_report(image, model, PredictionSettings(crop=crop))[0])
             for crop in ("exact", "box")}
    default = sitk.GetArrayFromImage(predict_image_with_report(image, model)[0])
    assert np.array_equal(default, masks["box"])
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(image, str(images / "case_0000.nii.gz"))
    for flags, crop in (([], "box"), (["--crop", "exact"], "exact"), (["--no-crop"], "none")):
        out = tmp_path / f"out{len(flags)}"
        result = subprocess.run([sys.executable, "-m", "inference", "-i", images, "-o", out, "-m", model_dir,
                                 "--device", "cpu", "--backend", "torch", *flags], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"{crop} crop" in result.stderr
        if crop in masks:
            assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz"))), masks[crop])
    result = subprocess.run([sys.executable, "-m", "inference", "-i", images, "-o", tmp_path / "x", "-m", model_dir,
                             "--no-crop", "--crop", "box"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--no-crop contradicts --crop box" in result.stderr and not (tmp_path / "x").exists()


def test_crop_must_be_a_mode():
    with pytest.raises(ValueError, match="crop must be one of exact, box, none"):
        PredictionSettings(crop=False)


def records_file(model_dir: Path, **records) -> None:
    (model_dir / CALIBRATION_FILE).write_text(json.dumps({"records": records}))


def one_record(fingerprint: str, patch_scale: float, precision: str | None = None) -> dict:
    chosen = {"patch_scale": patch_scale, "step_size": 0.5, "backend": "torch", "crop": "exact"}
    return {"chosen": chosen if precision is None else {**chosen, "precision": precision},
            "model_fingerprint": fingerprint}


def test_each_kind_of_device_has_its_own_record_and_a_run_says_whose_it_uses(tmp_path):
    """A run takes its own device's record; where there is none, the other's tiling, and its line says it was measured
    elsewhere (on CUDA: that the precision is unmeasured there). A CUDA record's precision is read; the CPU's must be
    fp32."""
    model_dir = make_toy_model(tmp_path / "model")
    fingerprint = load_model(model_dir, device="cpu").fingerprint()
    records_file(model_dir, cpu=one_record(fingerprint, 1.2), cuda=one_record(fingerprint, 1.5, "fp32"))
    on_cpu, on_cuda = read_calibration(model_dir, "cpu"), read_calibration(model_dir, "cuda")
    assert (on_cpu.device, on_cpu.patch_scale, on_cpu.precision) == ("cpu", 1.2, "fp32")
    assert (on_cuda.device, on_cuda.patch_scale, on_cuda.precision) == ("cuda", 1.5, "fp32")
    records_file(model_dir, cpu=one_record(fingerprint, 1.2))
    model = load_model(model_dir, device="cpu")
    settings, line = calibrated_settings(model)
    assert settings.patch_scale == 1.2 and "measured on" not in line
    assert read_calibration(model_dir, "cuda").device == "cpu"  # the only record there is
    # the same model as a CUDA run would hold it (no GPU here): the CPU's tiling, and the line says so
    settings, line = settings_from_record(read_calibration(model_dir, "cuda"), fingerprint, "cuda")
    assert settings.patch_scale == 1.2
    assert "measured on cpu, not on cuda: its precision unmeasured here; `python -m inference.calibrate --device " \
        "cuda` measures it" in line
    assert calibrated_settings(replace(model, device=torch.device("cuda")))[1] == line
    # the precision a run decides: a cuda record's, for its own model and on CUDA only; else none recorded
    records_file(model_dir, cpu=one_record(fingerprint, 1.2), cuda=one_record(fingerprint, 1.5, "fp32"))
    cuda_record = read_calibration(model_dir, "cuda")
    assert recorded_precision(cuda_record, fingerprint, "cuda") == "fp32"
    assert recorded_precision(cuda_record, "other weights", "cuda") is None
    assert recorded_precision(cuda_record, fingerprint, "cpu") is None
    assert recorded_precision(read_calibration(model_dir, "cpu"), fingerprint, "cuda") is None
    settings, line = settings_from_record(cuda_record, fingerprint, "cuda")
    assert settings.patch_scale == 1.5 and line.endswith("exact crop, fp32") and "measured on" not in line
    records_file(model_dir, cuda=one_record(fingerprint, 1.5))  # a CUDA record of engine 0.22: it measured fp16
    assert read_calibration(model_dir, "cpu").device == "cuda"
    assert read_calibration(model_dir, "cuda").precision == "fp16"
    records_file(model_dir, cpu=one_record(fingerprint, 1.2, "fp16"))
    with pytest.raises(ModelError, match="the cpu record's precision must be fp32"):
        read_calibration(model_dir, "cpu")
    for stored, problem in (({"records": {"tpu": one_record(fingerprint, 1.2)}}, "cpu, cuda only, not tpu"),
                            ({"records": {"cuda": one_record(fingerprint, 1.2, "int8")}},
                             "precision one of fp16, fp32")):
        (model_dir / CALIBRATION_FILE).write_text(json.dumps(stored))
        with pytest.raises(ModelError, match=problem):
            read_calibration(model_dir, "cuda")


def test_calibrating_one_device_keeps_the_others_record_of_the_same_model_only(tmp_path, caplog):
    model_dir = make_toy_model(tmp_path / "model", patch_size=(8, 8, 8))
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(make_ct_image(shape_zyx=(16, 48, 48), seed=1), str(images / "case0_0000.nii.gz"))
    fingerprint = load_model(model_dir, device="cpu").fingerprint()
    cuda = one_record(fingerprint, 1.5, "fp16")
    records_file(model_dir, cuda=cuda)
    with caplog.at_level(logging.INFO, logger="inference"):
        assert calibrate_main(["-m", str(model_dir), "--images", str(images)]) == 0
    records = json.loads((model_dir / CALIBRATION_FILE).read_text())["records"]
    assert records["cuda"] == cuda and records["cpu"]["model_fingerprint"] == fingerprint
    # x1.2 and x1.5 of an 8^3 patch both round up to 12^3 (the stride is 4): measured once, listed twice
    listed = {(c["patch_scale"], c["step_size"], c["crop"]): c for c in records["cpu"]["candidates"]}
    assert listed[(1.2, 0.5, "exact")]["inference_patch"] == listed[(1.5, 0.5, "exact")]["inference_patch"] == [12] * 3
    twin = listed[(1.5, 0.75, "box")]
    assert twin["same_as"] == 1.2 and listed[(1.2, 0.75, "box")]["same_as"] is None
    assert {k: v for k, v in twin.items() if k not in ("patch_scale", "same_as", "qualifies")} == \
        {k: v for k, v in listed[(1.2, 0.75, "box")].items() if k not in ("patch_scale", "same_as", "qualifies")}
    assert sum("not measured again" in m for m in caplog.messages) == 4  # one per step and crop
    records_file(model_dir, cuda=one_record("other weights", 1.5, "fp16"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inference"):
        assert calibrate_main(["-m", str(model_dir), "--images", str(images)]) == 0
    assert list(json.loads((model_dir / CALIBRATION_FILE).read_text())["records"]) == ["cpu"]
    assert any("its cuda record was measured on another model" in m and "dropped" in m for m in caplog.messages)


def test_precision_is_checked_before_any_work_and_kept_when_a_network_moves(tmp_path):
    model_dir = make_toy_model(tmp_path / "model")
    with pytest.raises(ValueError, match="--precision fp16: on CUDA only"):
        load_model(model_dir, device="cpu", precision="fp16")
    assert load_model(model_dir, device="cpu", precision="fp32").precision == "fp32"
    network = load_model(model_dir, device="cpu").networks[0]
    assert isinstance(network, TorchNetwork) and not TorchNetwork(network.module, network.device, fp16=False).on(
        torch.device("cpu")).fp16
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(make_ct_image(), str(images / "case_0000.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "inference", "-i", images, "-o", tmp_path / "out", "-m", model_dir,
                             "--device", "cpu", "--precision", "fp16"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--precision fp16: on CUDA only" in result.stderr and not list((tmp_path / "out").glob("*.nii.gz"))
    assert "export" not in result.stderr  # refused before the CPU export a first `--backend auto` run makes


def test_a_cpu_run_takes_no_backend_from_a_cuda_record(tmp_path):
    """A folder holding only a cuda record (its backend: torch): a CPU run takes its tiling but the CPU's own default
    backend, ONNX Runtime where it can be had."""
    model_dir = make_toy_model(tmp_path / "model")
    records_file(model_dir, cuda=one_record(load_model(model_dir, device="cpu").fingerprint(), 1.5, "fp16"))
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(make_ct_image(shape_zyx=SHAPE), str(images / "case_0000.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "inference", "-i", images, "-o", tmp_path / "out", "-m", model_dir,
                             "--device", "cpu", "--report", tmp_path / "report.json"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "measured on cuda, not on cpu" in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backend"] == "onnx" and report["precision"] == "fp32"
    assert report["cases"]["case_0000.nii.gz"]["patch_size"] == PATCH[1.5]
