"""Choosing the inference patch under a GPU memory budget: the pure parts, which need no GPU."""
from pathlib import Path

import pytest
import torch

from inference.gpu_memory import ForwardMemory, accumulators_mb, voxels
from inference.network_plan import candidate_patches, choose_patch, largest_fitting_patch, probe_patches
from inference.model import load_model

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"

# forward-pass allocations of the 102 M-parameter ResEnc-L measured on an H200
# (results/gpu_forward_memory.md): weights (390 MB) + activations, fp16 autocast
RESENC_L_MB = {128: 1378.4, 160: 2318.9, 192: 3722.9}


def test_candidates_run_from_the_enlarged_patch_down_by_one_stride_to_half_the_training_patch():
    assert candidate_patches((192, 192, 192), (160, 160, 160), (32, 32, 32)) == [
        (192, 192, 192), (160, 160, 160), (128, 128, 128), (96, 96, 96)]
    # anisotropic: each axis stops at its own floor; no duplicates when enlarged == training
    assert candidate_patches((64, 128, 128), (64, 128, 128), (16, 32, 32)) == [
        (64, 128, 128), (48, 96, 96), (32, 64, 64)]


def test_no_patch_goes_below_two_total_strides():
    # one stride would leave the deepest stage a single voxel, which instance norm rejects
    assert candidate_patches((32, 32, 32), (32, 32, 32), (16, 16, 16)) == [(32, 32, 32)]
    assert probe_patches((32, 32, 32), (16, 16, 16)) == ((32, 32, 32), (48, 48, 48))


def test_probes_are_smaller_than_the_training_patch_and_distinct():
    assert probe_patches((160, 160, 160), (32, 32, 32)) == ((96, 96, 96), (128, 128, 128))


def test_a_line_through_two_measured_patches_predicts_the_third_within_one_percent():
    forward = ForwardMemory.fit([((128,) * 3, RESENC_L_MB[128]), ((160,) * 3, RESENC_L_MB[160])])
    assert forward.predict_mb((192,) * 3) == pytest.approx(RESENC_L_MB[192], rel=0.01)
    assert forward.intercept_mb == pytest.approx(390, abs=15)  # the weights


def test_the_largest_patch_within_budget_wins_and_an_over_budget_model_gets_the_smallest():
    forward = ForwardMemory.fit([((128,) * 3, RESENC_L_MB[128]), ((160,) * 3, RESENC_L_MB[160])])
    candidates = candidate_patches((192,) * 3, (160,) * 3, (32,) * 3)

    def peak(patch):
        return 1250 + 1.3 * (accumulators_mb((300, 250, 330), patch, 2) + forward.predict_mb(patch))

    patch, predicted, fits = largest_fitting_patch(candidates, peak, 4096)
    assert (patch, fits) == ((128, 128, 128), True) and predicted <= 4096
    assert largest_fitting_patch(candidates, peak, 8192)[0] == (192, 192, 192)
    patch, predicted, fits = largest_fitting_patch(candidates, peak, 1000)
    assert (patch, fits) == ((96, 96, 96), False) and predicted > 1000


def test_accumulators_cover_the_volume_padded_to_the_patch():
    # 3 fp16 channels (2 logits + weights) of a 100^3 volume, + a 64^3 Gaussian
    assert accumulators_mb((100, 100, 100), (64, 64, 64), 2) == pytest.approx(
        (3 * 100 ** 3 + 64 ** 3) * 2 / 2 ** 20)
    assert accumulators_mb((10, 100, 100), (64, 64, 64), 2) == pytest.approx(
        (3 * 64 * 100 * 100 + 64 ** 3) * 2 / 2 ** 20)


def test_the_probe_passes_run_through_the_shipped_network_and_the_enlarged_patch_fits_easily():
    model = load_model(DEFAULT_MODEL, device="cpu")
    config = model.config
    probed = []

    def forward_mb(patch):
        logits = model.networks[0](torch.zeros((1, 1, *patch)))
        assert tuple(logits.shape[2:]) == patch
        probed.append(patch)
        return 5.4 + 123e-6 * voxels(patch)  # about what this network allocated per voxel on the H200

    patch, predicted, fits = choose_patch((48, 48, 48), config.patch_size, config.total_stride, (60, 100, 100),
                                          config.num_classes, 4096, forward_mb, lambda: 1250.0)
    assert len(probed) == 2 and all(p <= 48 for probe in probed for p in probe)
    assert (patch, fits) == ((48, 48, 48), True) and 1250 < predicted < 2100


def test_a_100m_parameter_model_gets_a_patch_under_its_training_patch_to_stay_under_4_gb():
    def forward_mb(patch):  # the ResEnc-L line, weights (already allocated) taken off
        return RESENC_L_MB[128] - 390 + 470.7e-6 * (voxels(patch) - 128 ** 3)

    patch, predicted, fits = choose_patch((192,) * 3, (160,) * 3, (32,) * 3, (300, 250, 330), 2, 4096,
                                          forward_mb, lambda: 1650.0)
    assert (patch, fits) == ((128, 128, 128), True) and predicted <= 4096
    patch, _, _ = choose_patch((192,) * 3, (160,) * 3, (32,) * 3, (300, 250, 330), 2, 16000,
                               forward_mb, lambda: 1650.0)
    assert patch == (192, 192, 192)
