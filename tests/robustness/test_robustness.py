"""Every scenario of the robustness corpus (corpus.py), one test each, plus the in-process checks a fresh
process cannot make: the mask away from NaN voxels, the partial file of a write that is interrupted, and the
scores run_metrics gives a broken prediction."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from corpus import (IMPORTS_BY_NAME, MARKER, SCENARIOS, ct_image, hostile_model, make_reference, run_scenario,
                    set_network_class, toy_model, write)
from inference import io, load_model, predict_image, predict_image_with_report
from inference.backends import TorchNetwork
from inference.errors import CaseError


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    return make_reference(tmp_path_factory.mktemp("robustness"))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario, reference, tmp_path):
    outcome = run_scenario(scenario, tmp_path / scenario.name, reference)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert not outcome.problems, f"{outcome.problems}\nstderr:\n{outcome.stderr[-3000:]}"


def test_broken_prediction_scores_zero_in_the_mean(reference, tmp_path):
    scenario = next(s for s in SCENARIOS if s.name == "metrics-broken-prediction")
    outcome = run_scenario(scenario, tmp_path, reference)
    assert not outcome.problems, outcome.problems
    per_case = pd.read_csv(tmp_path / "metrics.csv").set_index("case")
    assert per_case.loc["a", "Lesion_DSC"] == 1.0 and per_case.loc["b", "Lesion_DSC"] == 0.0
    assert per_case.loc["b", "rule"] == "broken_prediction"
    summary = pd.read_csv(tmp_path / "metrics_summary.csv").set_index("metric")
    assert summary.loc["Lesion_DSC", "n"] == 2 and summary.loc["Lesion_DSC", "mean"] == 0.5


class Threshold(torch.nn.Module):
    """Lesion logit grows with (normalised) intensity: voxel-wise, so only NaNs could change the mask far away."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x * 10], dim=1)


def test_nan_block_leaves_the_mask_away_from_it_unchanged(tmp_path, caplog):
    model = load_model(toy_model(tmp_path / "model"), device="cpu")
    model.networks = [TorchNetwork(Threshold(), torch.device("cpu"))]
    clean = ct_image(shape_zyx=(24, 48, 48), spacing_xyz=(3.0, 3.0, 3.0), dtype=np.float32)
    array = sitk.GetArrayFromImage(clean)
    array[10:13, 20:24, 20:24] = np.nan
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(clean)
    path = write(damaged, tmp_path / "nan_0000.mha")
    with caplog.at_level(logging.WARNING, logger="inference"):
        repaired = io.read_image(path)
    assert "nan_0000.mha: 48 NaN or infinite voxel(s) set to the lowest finite value" in caplog.text
    expected = sitk.GetArrayFromImage(predict_image(clean, model))
    got = sitk.GetArrayFromImage(predict_image(repaired, model))
    away = np.ones(expected.shape, bool)
    away[8:15, 18:26, 18:26] = False  # the block and a voxel around it (the body's blob lies elsewhere)
    assert expected[away].sum() > 100  # the mask is not empty where it is compared
    assert np.array_equal(got[away], expected[away])


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    mask = sitk.GetImageFromArray(np.ones((4, 5, 6), np.uint8))
    real_write = sitk.WriteImage

    def write_then_stop(image, name, *args, **kwargs):
        real_write(image, name, *args, **kwargs)
        raise KeyboardInterrupt  # SIGTERM arrives once the partial file exists

    monkeypatch.setattr(sitk, "WriteImage", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        io.write_image_atomically(mask, tmp_path / "case.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_a_cut_short_write_is_a_case_error_and_leaves_nothing(tmp_path, monkeypatch):
    """ITK reports a full disk only on stderr and returns: what was written is checked."""
    mask = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 2, (20, 30, 40)).astype(np.uint8))
    real_write = sitk.WriteImage

    def write_cut_short(image, name, *args, **kwargs):
        real_write(image, name, *args, **kwargs)
        with open(name, "r+b") as f:
            f.truncate(200)

    monkeypatch.setattr(sitk, "WriteImage", write_cut_short)
    with pytest.raises(CaseError, match="case.nii.gz: the mask was not written completely"):
        io.write_image_atomically(mask, tmp_path / "case.nii.gz")
    assert list(tmp_path.iterdir()) == []


class SlowNetwork(torch.nn.Module):
    """A fixed cost per window, so that the engine's prediction of the network time is predictable."""

    def forward(self, x):
        import time
        time.sleep(0.02)
        return torch.cat([torch.zeros_like(x), x], dim=1)


def test_time_budget_takes_a_larger_step_and_says_so(tmp_path, caplog):
    from inference import PredictionSettings
    model = load_model(toy_model(tmp_path / "model"), device="cpu")
    model.networks = [TorchNetwork(SlowNetwork(), torch.device("cpu"))]
    image = ct_image(shape_zyx=(40, 200, 200), spacing_xyz=(3.0, 3.0, 3.0))
    _, relaxed = predict_image_with_report(image, model, PredictionSettings(time_budget_s=600))
    assert relaxed.step_size == 0.5 and "time budget" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="inference"):
        _, tight = predict_image_with_report(image, model, PredictionSettings(time_budget_s=0.5, patch_scale=1.2))
    assert tight.step_size == 1.0
    # 81 windows of 40^3 meet the body at step 0.5 (on the whole volume's grid: the exact crop), 25 at step 1 (each
    # sleeps 0.02 s: 0.5 s > the 0.45 s left)
    assert "(81 windows x" in caplog.text and "time budget: step 0.5 -> 1 (25 windows" in caplog.text


def test_on_error_empty_writes_an_empty_mask_on_the_inputs_grid(tmp_path):
    import subprocess
    import sys
    from corpus import REPO, engine_args
    model = toy_model(tmp_path / "model")
    bogus = write(ct_image(shape_zyx=(8, 8, 8), spacing_xyz=(60.0, 60.0, 60.0)), tmp_path / "in" / "bogus_0000.nii.gz")
    (tmp_path / "in" / "gone_0000.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    result = subprocess.run([sys.executable, "-m", "inference", *engine_args(tmp_path / "in", tmp_path / "out", model),
                             "--on-error", "empty"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "bogus_0000.nii.gz: wrote an empty mask bogus.nii.gz (--on-error empty)" in result.stderr
    assert "gone_0000.nii.gz: no empty mask either" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bogus.nii.gz"]
    mask, source = sitk.ReadImage(str(tmp_path / "out" / "bogus.nii.gz")), sitk.ReadImage(str(bogus))
    assert mask.GetSize() == source.GetSize() and mask.GetSpacing() == source.GetSpacing()
    assert mask.GetOrigin() == source.GetOrigin() and mask.GetDirection() == source.GetDirection()
    assert mask.GetPixelID() == sitk.sitkUInt8 and not sitk.GetArrayViewFromImage(mask).any()


@pytest.mark.parametrize("edit", [IMPORTS_BY_NAME, set_network_class("model.evil.Net")],
                         ids=["plans-name-import-module", "plans-names-model-folder-code"])
def test_the_hostile_plans_run_their_payload_where_the_guard_is_switched_off(edit, tmp_path, monkeypatch):
    """The control of the "code from a model folder" scenarios, whose check is that the marker never appears:
    with the model folder's code importable as the scenarios make it, and the guard (network.py's allow-list of
    torch.nn.Module classes) replaced by a plain import, the same plans do run the payload. (The import-helper
    and module scenarios name things the network would not call in a way that imports: refused by type.)"""
    import importlib
    import sys
    from inference.model import network
    model = hostile_model(tmp_path, edit)
    payload = ("model", "model.evil", "evil")
    for name in payload:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(model))

    def unguarded(name, source, key):
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except AttributeError:
            raise network.ModelError(f"{source}: {key}: no {attr}") from None

    with pytest.raises(network.ModelError):  # the guard's own check is still there
        load_model(model, device="cpu", backend="torch")
    assert not (model / MARKER).exists()
    monkeypatch.setattr(network, "import_network_class", unguarded)
    try:
        load_model(model, device="cpu", backend="torch")
    except Exception:  # the payload is no network: what matters is whether its code ran
        pass
    finally:
        for name in payload:  # imported here: not left for other tests
            sys.modules.pop(name, None)
    assert (model / MARKER).exists()
