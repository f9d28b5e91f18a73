"""The lesion filter: components, their volume and peak probability, dropping them, the model folder's
lesion_filter.json, the CLI flags, and the tuning benchmark's scoring."""
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_ct_image
from inference import PredictionSettings, load_model, predict_image, predict_image_with_report
from inference.backends import TorchNetwork
from inference.errors import ModelError
from inference.lesion_filter import (FILTER_FILE, LesionFilter, filter_lesions, lesion_components,
                                     read_lesion_filter)
from inference.postprocess import lesion_mask_at_shape

REPO = Path(__file__).resolve().parent.parent
VOXEL_ML = 0.027  # 3 mm voxels


def two_blob_logits() -> torch.Tensor:
    """Background logit 0; a 3x3x3 lesion with peak margin 4 and a one-voxel lesion with margin 0.5."""
    logits = torch.zeros(2, 10, 10, 10)
    logits[1] = -3.0
    logits[1, 1:4, 1:4, 1:4] = 1.0
    logits[1, 2, 2, 2] = 4.0
    logits[1, 8, 8, 8] = 0.5
    return logits


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_components_have_volume_and_peak_probability():
    found = lesion_components(two_blob_logits(), (1,), VOXEL_ML)
    assert found.labels.max() == 2
    order = np.argsort(-found.volume_ml)
    assert found.volume_ml[order] == pytest.approx([27 * VOXEL_ML, VOXEL_ML])
    assert found.peak_probability[order] == pytest.approx([sigmoid(4.0), sigmoid(0.5)], rel=1e-6)
    assert found.labels[2, 2, 2] != found.labels[8, 8, 8]


def test_peak_probability_sums_the_lesion_labels():
    logits = torch.zeros(3, 4, 4, 4)
    logits[:, 1, 1, 1] = torch.tensor([1.0, 0.9, 0.8])  # background wins; organ + lesion would not
    logits[:, 2, 2, 2] = torch.tensor([0.0, 2.0, 1.0])  # label 1 wins
    found = lesion_components(logits, (1, 2), VOXEL_ML)
    assert len(found.volume_ml) == 1
    expected = torch.tensor([0.0, 2.0, 1.0]).softmax(0)[1:].sum().item()
    assert found.peak_probability[0] == pytest.approx(expected, rel=1e-6)


def test_no_lesion_no_components():
    found = lesion_components(torch.zeros(2, 5, 5, 5), (1,), VOXEL_ML)
    assert found.labels.max() == 0 and len(found.volume_ml) == 0


@pytest.mark.parametrize("lesion_filter, big_kept, small_kept", [
    (LesionFilter(min_volume_ml=0.1), True, False),          # 0.027 ml < 0.1 ml
    (LesionFilter(min_peak_probability=0.7), True, False),   # sigmoid(0.5) = 0.62
    (LesionFilter(min_peak_probability=0.99), False, False),  # sigmoid(4) = 0.982
    (LesionFilter(min_volume_ml=0.02, min_peak_probability=0.6), True, True),
])
def test_filter_drops_exactly_the_weak_components(lesion_filter, big_kept, small_kept):
    logits = two_blob_logits()
    before = lesion_mask_at_shape(logits.clone(), (10, 10, 10), (1,))
    filtered, found, dropped = filter_lesions(logits, (1,), VOXEL_ML, lesion_filter)
    after = lesion_mask_at_shape(filtered, (10, 10, 10), (1,))
    assert (found, dropped) == (2, 2 - big_kept - small_kept)
    big, small = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    big[:5, :5, :5], small[5:, 5:, 5:] = True, True
    before, after = before.numpy().astype(bool), after.numpy().astype(bool)
    assert before[big].any() and before[small].any()
    assert np.array_equal(after[big], before[big] if big_kept else np.zeros_like(before[big]))
    assert np.array_equal(after[small], before[small] if small_kept else np.zeros_like(before[small]))


def test_model_folder_filter_file(tmp_path):
    assert read_lesion_filter(tmp_path) == LesionFilter() and not LesionFilter().active
    (tmp_path / FILTER_FILE).write_text(json.dumps({"min_volume_ml": 2.5, "min_peak_probability": 0.9,
                                                    "tuned_by": "a note"}))
    assert read_lesion_filter(tmp_path) == LesionFilter(2.5, 0.9)
    assert read_lesion_filter(tmp_path).with_overrides(None, 0.0) == LesionFilter(2.5, 0.0)
    (tmp_path / FILTER_FILE).write_text("{not json")
    with pytest.raises(ModelError, match=FILTER_FILE):
        read_lesion_filter(tmp_path)
    (tmp_path / FILTER_FILE).write_text(json.dumps({"min_peak_probability": 1.5}))
    with pytest.raises(ModelError, match="min_peak_probability"):
        read_lesion_filter(tmp_path)


class TwoBlobNetwork(torch.nn.Module):
    """Ignores the image: the two-blob logits of the test above, wherever the window is."""

    def forward(self, x):
        logits = torch.full((x.shape[0], 2) + tuple(x.shape[2:]), -3.0)
        logits[:, 0] = 0
        logits[:, 1, 2:5, 2:5, 2:5] = 2.0
        logits[:, 1, 12, 12, 12] = 0.5
        return logits


def test_engine_applies_the_folder_filter_and_settings_override_it(tmp_path, toy_model_dir):
    (toy_model_dir / FILTER_FILE).write_text(json.dumps({"min_volume_ml": 0.1}))
    model = load_model(toy_model_dir, device="cpu")
    assert model.lesion_filter == LesionFilter(0.1, 0.0)
    model.networks = [TorchNetwork(TwoBlobNetwork(), torch.device("cpu"))]
    image = sitk.GetImageFromArray(np.zeros((16, 16, 16), np.int16))
    image.SetSpacing((3.0, 3.0, 3.0))  # the toy model's spacing: no resampling
    settings = PredictionSettings(crop="none", patch_size=(16, 16, 16))
    filtered, report = predict_image_with_report(image, model, settings)
    filtered = sitk.GetArrayFromImage(filtered)
    assert filtered.sum() == 27 and filtered[3, 3, 3] == 1 and filtered[12, 12, 12] == 0
    assert report.lesions_dropped == (1, 2) and "filter" in report.seconds
    unfiltered = sitk.GetArrayFromImage(predict_image(image, model, replace(settings, min_lesion_ml=0.0)))
    assert unfiltered.sum() == 28 and unfiltered[12, 12, 12] == 1


def test_cli_rejects_a_negative_threshold(tmp_path, toy_model_dir):
    done = subprocess.run([sys.executable, "-m", "inference", "-i", str(tmp_path), "-o", str(tmp_path / "o"),
                           "-m", str(toy_model_dir), "--min-lesion-ml", "-1"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "must be >= 0" in done.stderr


def test_cli_reports_a_broken_filter_file_in_one_line(tmp_path, toy_model_dir):
    (toy_model_dir / FILTER_FILE).write_text("[1, 2]")
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16)), str(tmp_path / "in" / "a_0000.nii.gz"))
    done = subprocess.run([sys.executable, "-m", "inference", "-i", str(tmp_path / "in"), "-o",
                           str(tmp_path / "o"), "-m", str(toy_model_dir), "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and FILTER_FILE in done.stderr


# ---- training/tune_lesion_filter.py: scoring without predicting again --------------------------------

def tuning_cases():
    """One lesion case (a true 10-voxel lesion at p 0.95, a 2-voxel false positive at p 0.7) and one
    healthy case (a 1-voxel false positive at p 0.9)."""
    lesion = {"truth_voxels": 10, "voxel_ml": 1.0, "truth_lesions_touched_by": [[1]],
              "components": [{"volume_ml": 10.0, "peak_probability": 0.95, "truth_voxels": 8},
                             {"volume_ml": 2.0, "peak_probability": 0.7, "truth_voxels": 0}]}
    healthy = {"truth_voxels": 0, "voxel_ml": 1.0, "truth_lesions_touched_by": [],
               "components": [{"volume_ml": 1.0, "peak_probability": 0.9, "truth_voxels": 0}]}
    return [lesion, healthy]


def test_tuning_scores_and_picks_the_mildest_best_filter():
    from training.tune_lesion_filter import best_filter, score_filter, score_grid
    none = score_filter(tuning_cases(), LesionFilter())
    assert none["lesion_dsc"] == pytest.approx(2 * 8 / (12 + 10))
    assert none["healthy_fp_rate"] == 1.0 and none["all_cases_dsc"] == pytest.approx(16 / 22 / 2)
    by_volume = score_filter(tuning_cases(), LesionFilter(min_volume_ml=3.0))  # drops both FPs
    assert by_volume["lesion_dsc"] == pytest.approx(16 / 20) and by_volume["healthy_fp_rate"] == 0.0
    assert by_volume["all_cases_dsc"] == pytest.approx((0.8 + 1.0) / 2) and by_volume["lesion_recall"] == 1.0
    too_strong = score_filter(tuning_cases(), LesionFilter(min_peak_probability=0.96))
    assert too_strong["lesion_dsc"] == 0.0 and too_strong["lesion_recall"] == 0.0
    grid = score_grid(tuning_cases(), volumes=(0.0, 3.0, 5.0), probabilities=(0.0, 0.8, 0.96))
    best = best_filter(grid, "all_cases_dsc")
    assert (best["min_volume_ml"], best["min_peak_probability"]) == (3.0, 0.0)
    vanished = {"healthy": False, "truth_voxels": 0, "voxel_ml": 1.0, "truth_lesions_touched_by": [],
                "components": []}  # a lesion case whose lesions are below one model voxel
    scores = score_filter(tuning_cases() + [vanished], LesionFilter())
    assert scores["healthy_fp_rate"] == 1.0 and scores["lesion_dsc"] == pytest.approx((16 / 22 + 1) / 2)
    best = best_filter(grid, "lesion_dsc")  # the healthy case's false positive does not count
    assert (best["min_volume_ml"], best["min_peak_probability"]) == (0.0, 0.8)
    grid = score_grid(tuning_cases(), volumes=(0.0, 11.0), probabilities=(0.0,))
    assert best_filter(grid, "all_cases_dsc")["min_volume_ml"] == 11.0  # empties everything: 0.5 > 0.36
    assert best_filter(grid, "all_cases_dsc", max_recall_loss=0.5)["min_volume_ml"] == 0.0


def test_tuning_refuses_the_evaluation_seed():
    from training.tune_lesion_filter import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--seed", "7"])
    assert exit_info.value.code == 2


def test_tuning_records_each_predicted_lesion_against_the_truth(toy_model_dir):
    from training.tune_lesion_filter import case_components
    from test_engine import THRESHOLD_HU, threshold_model
    image = make_ct_image(shape_zyx=(24, 64, 64), spacing_xyz=(0.8, 0.8, 2.5))
    label = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > THRESHOLD_HU).astype(np.uint8))
    label.CopyInformation(image)
    case = case_components(image, label, threshold_model(toy_model_dir, (3.0, 3.0, 3.0)), PredictionSettings())
    assert case["voxel_ml"] == pytest.approx(0.027) and case["truth_voxels"] > 20
    [component] = case["components"]  # the bright blob, and nothing else
    assert component["peak_probability"] > 0.99
    predicted_voxels = component["volume_ml"] / case["voxel_ml"]
    dice = 2 * component["truth_voxels"] / (predicted_voxels + case["truth_voxels"])
    assert dice > 0.85
    assert case["truth_lesions_touched_by"] == [[1]]


def stub_tuning_cases(monkeypatch, cases_for) -> list[str]:
    """tune_lesion_filter without phantoms or a network: every seed's set is one lesion case and one healthy case,
    whose statistics `cases_for(image path)` gives as [lesion, healthy]. Returns the list of image paths predicted."""
    import training.tune_lesion_filter as tune
    monkeypatch.setattr(tune, "write_eval_set",
                        lambda *args: [{"case": "phantom_0000", "lesions": [{"type": "liver"}]},
                                       {"case": "healthy_0000", "lesions": []}])
    monkeypatch.setattr(tune.sitk, "ReadImage", lambda path: path)
    predicted = []

    def recorded_case(image, label, model, settings):
        predicted.append(str(image))
        return cases_for(str(image))[0 if "phantom" in Path(image).name else 1]

    monkeypatch.setattr(tune, "case_components", recorded_case)
    return predicted


def test_tuning_writes_the_best_filter_and_reuses_statistics_of_the_same_weights_only(
        tmp_path, toy_model_dir, monkeypatch):
    import training.tune_lesion_filter as tune
    from conftest import make_toy_model
    predicted = stub_tuning_cases(monkeypatch, lambda image: tuning_cases())
    argv = ["--model", str(toy_model_dir), "--seed", "8", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "results"), "--reuse", "--write"]
    assert tune.main(argv) == 0
    assert [Path(p).name for p in predicted] == ["phantom_0000_0000.nii.gz", "healthy_0000_0000.nii.gz"]
    written = json.loads((toy_model_dir / FILTER_FILE).read_text())
    # the mildest filter that drops the lesion case's false positive (p 0.7) and keeps the lesion (p 0.95)
    assert (written["min_volume_ml"], written["min_peak_probability"]) == (0.0, 0.8)
    assert written["validation"]["lesion_dsc"] == pytest.approx(0.8)
    assert read_lesion_filter(toy_model_dir) == LesionFilter(0.0, 0.8)
    assert {p.name for p in (tmp_path / "results").iterdir()} == {
        "lesion_filter_tuning.json", "lesion_filter_tuning.md", "lesion_filter_tuning.png"}
    assert tune.main(argv) == 0 and len(predicted) == 2  # same weights: nothing predicted again
    make_toy_model(toy_model_dir, seed=99)
    assert tune.main(argv) == 0 and len(predicted) == 4  # new weights: both cases again


def test_tuning_pools_several_validation_seeds_and_scores_the_shipped_filter(tmp_path, toy_model_dir, monkeypatch):
    import training.tune_lesion_filter as tune

    def cases_of_seed(image: str) -> list[dict]:
        lesion, healthy = tuning_cases()
        if "seed9" in image:  # seed 9's lesion is fainter: p 0.85, below seed 8's false positive's p 0.9
            lesion["components"][0]["peak_probability"] = 0.85
            lesion["components"][1]["peak_probability"] = 0.9
        return [lesion, healthy]

    predicted = stub_tuning_cases(monkeypatch, cases_of_seed)
    (toy_model_dir / FILTER_FILE).write_text(json.dumps({"min_volume_ml": 0.0, "min_peak_probability": 0.99}))
    results = tmp_path / "results"
    assert tune.main(["--model", str(toy_model_dir), "--seed", "8", "9", "--work", str(tmp_path / "work"),
                      "--results", str(results)]) == 0
    assert len(predicted) == 4 and sum("seed9" in p for p in predicted) == 2
    written = json.loads((results / "lesion_filter_tuning.json").read_text())
    assert written["seeds"] == [8, 9] and (written["lesion_cases"], written["healthy_cases"]) == (2, 2)
    # pooled, only the volume can drop both false positives (2 and 1 ml) and keep both lesions
    assert (written["best"]["min_volume_ml"], written["best"]["min_peak_probability"]) == (3.0, 0.0)
    assert written["best"]["lesion_dsc"] == pytest.approx(0.8) and written["best"]["lesion_recall"] == 1.0
    assert written["per_seed"]["9"]["unfiltered"]["lesion_dsc"] == pytest.approx(16 / 22)
    assert written["per_seed"]["9"]["chosen"]["lesion_dsc"] == pytest.approx(0.8)
    # the folder's own filter (p >= 0.99) drops every lesion: scored on the same cases, and left in place
    shipped = written["shipped"]
    assert shipped["min_peak_probability"] == 0.99 and shipped["lesion_recall"] == 0.0
    assert shipped["healthy_fp_rate"] == 0.0 and shipped["generator_mix_dsc"] == pytest.approx(0.2)
    assert "| the model folder's lesion_filter.json | 0 | 0.99 |" in (results / "lesion_filter_tuning.md").read_text()
    assert read_lesion_filter(toy_model_dir) == LesionFilter(0.0, 0.99)
    for seeds in (["8", "8"], ["8", "7"]):
        with pytest.raises(SystemExit) as exit_info:
            tune.main(["--model", str(toy_model_dir), "--seed", *seeds, "--work", str(tmp_path / "work")])
        assert exit_info.value.code == 2
