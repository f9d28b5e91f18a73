"""Sliding window: coverage, equivalence with a whole-volume pass, fold ensembling, TTA, windows in lanes."""
import threading
import time

import pytest
import torch

from inference.errors import CaseError
from inference.network_plan import enlarged_patch_size
from inference.sliding_window import (gaussian_importance_map, in_order, pad_to_patch, predict_window,
                                      sliding_window_logits, window_slices, window_starts)


def pointwise_network(seed=0, classes=3):
    """Fully convolutional with 1x1x1 kernels: a window's output equals the whole volume's there."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.LeakyReLU(), torch.nn.Conv3d(8, classes, 1))
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("size,patch,step", [(100, 32, 0.5), (33, 32, 0.5), (32, 32, 0.5),
                                             (200, 48, 0.875), (97, 16, 0.25)])
def test_window_starts_cover_the_axis(size, patch, step):
    starts = window_starts(size, patch, step)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(b - a <= patch * step + 1e-9 for a, b in zip(starts, starts[1:]))
    assert starts == sorted(set(starts))


def test_window_starts_match_nnunet_rule():
    # n = ceil((size - patch) / (patch * step)) + 1 positions, evenly spread
    assert window_starts(100, 32, 0.5) == [0, 14, 27, 41, 54, 68]
    assert window_starts(20, 32, 0.5) == [0]


def test_every_voxel_is_covered():
    shape, patch = (37, 50, 29), (16, 24, 16)
    covered = torch.zeros(shape, dtype=torch.int32)
    for window in window_slices(shape, patch, 0.5):
        covered[window] += 1
    assert covered.min() >= 1


def test_gaussian_importance_map_shape_and_values():
    g = gaussian_importance_map((16, 20, 24))
    assert g.shape == (16, 20, 24)
    assert g.max() == pytest.approx(1.0) and g.min() > 0
    assert g[8, 10, 12] == g.max()  # peak at size // 2 on every axis, as nnU-Net
    torch.testing.assert_close(g[8 - 3, 10, 12], g[8 + 3, 10, 12])  # symmetric about that voxel
    assert g[8, 10, 12] > g[0, 0, 0] * 100


@pytest.mark.parametrize("shape", [(40, 52, 61), (10, 52, 30)])  # second: smaller than the patch on 2 axes
def test_matches_whole_volume_forward_for_fully_convolutional_net(shape):
    net = pointwise_network()
    volume = torch.randn(1, *shape)
    expected = net(volume[None])[0]
    logits = sliding_window_logits(volume, [net], (16, 32, 32), num_classes=3, step_size=0.5)
    assert logits.shape == (3, *shape)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_fold_ensemble_is_the_sum_of_folds():
    nets = [pointwise_network(seed) for seed in (1, 2, 3)]
    volume = torch.randn(1, 20, 24, 28)
    ensemble = sliding_window_logits(volume, nets, (16, 16, 16), num_classes=3)
    singles = sum(sliding_window_logits(volume, [n], (16, 16, 16), num_classes=3) for n in nets)
    torch.testing.assert_close(ensemble, singles, atol=1e-5, rtol=1e-5)


def test_mirroring_sums_all_eight_flips():
    net = pointwise_network()
    window = torch.randn(1, 1, 8, 8, 8)
    # a pointwise net is flip-equivariant, so the 8 flipped predictions are identical
    torch.testing.assert_close(predict_window([net], window, (0, 1, 2)), 8 * net(window), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(predict_window([net], window, ()), 8 * net(window))


def test_pad_to_patch_is_centred_and_reversible():
    volume = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 5, 6, 7)
    padded, unpad = pad_to_patch(volume, (8, 6, 10))
    assert padded.shape == (1, 8, 6, 10)
    assert torch.equal(padded[unpad], volume)
    assert padded[0, 0].abs().sum() == 0  # one zero slice before along z


def test_enlarged_patch_size_rounds_to_stride_and_caps_at_volume():
    assert enlarged_patch_size((160, 160, 160), (32, 32, 32), (400, 400, 400), 1.2) == (192, 192, 192)
    # small volume: no point in a patch larger than the (stride-rounded) volume, never below training
    assert enlarged_patch_size((64, 64, 64), (16, 16, 16), (70, 40, 200), 1.5) == (80, 64, 96)


def test_in_order_keeps_the_order_and_runs_at_most_a_bounded_number_ahead():
    started, consumed = [], []

    def slow_first(item):
        started.append(item)
        time.sleep(0.05 if item % 3 == 0 else 0.0)  # later items finish before earlier ones
        return item * 10

    for value in in_order(slow_first, range(20), lanes=2):
        consumed.append(value)
        assert len(started) <= len(consumed) + 2 * 2  # never more than 2 x lanes ahead of the consumer
    assert consumed == [i * 10 for i in range(20)]


def test_in_order_raises_the_first_failure_where_it_is_consumed():
    def fails_on_three(item):
        if item == 3:
            raise ValueError("window 3")
        return item

    results = in_order(fails_on_three, range(10), lanes=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="window 3"):
        next(results)


def test_in_order_closed_early_does_not_wait_for_the_calls_in_flight():
    release, finished = threading.Event(), []

    def held(item):
        if item > 0:
            release.wait(10)
        finished.append(item)
        return item

    results = in_order(held, range(6), lanes=2)
    assert next(results) == 0
    results.close()  # as a SIGTERM in the accumulation loop would: items 1 and 2 are running, 3 queued
    assert finished == [0]  # closed without waiting for the running ones
    release.set()


def nnunet_style_gaussian(patch, sigma_scale=1 / 8):
    """nnU-Net's construction, independent of ours: a delta at size // 2 blurred by scipy's Gaussian filter with
    sigma = patch / 8, scaled to a maximum of 1, zeros raised to the smallest positive value."""
    from scipy.ndimage import gaussian_filter
    import numpy as np
    delta = np.zeros(patch)
    delta[tuple(size // 2 for size in patch)] = 1
    blurred = gaussian_filter(delta, [size * sigma_scale for size in patch], 0, mode="constant", cval=0)
    blurred /= blurred.max()
    blurred[blurred == 0] = blurred[blurred != 0].min()
    return torch.from_numpy(blurred)


@pytest.mark.parametrize("patch", [(16, 20, 24), (32, 32, 32), (48, 40, 33)])
def test_gaussian_importance_map_is_nnunets(patch):
    torch.testing.assert_close(gaussian_importance_map(patch, dtype=torch.float64), nnunet_style_gaussian(patch),
                               rtol=0, atol=1e-7)


def test_sliding_window_of_a_real_convolution_network_equals_a_hand_weighted_reference():
    """A 3x3x3-convolution network (zero padding: a window's border voxels see less context than the whole
    volume's, so the weighting matters), against the Gaussian-weighted mean computed by hand, window by window.
    Uniform weights, another sigma or an off-centre peak give other logits."""
    import itertools
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(),
                              torch.nn.Conv3d(4, 2, 3, padding=1)).eval().requires_grad_(False)
    volume, patch, step = torch.randn(1, 30, 41, 37), (16, 16, 16), 0.5
    weights = nnunet_style_gaussian(patch).float()
    total = torch.zeros(2, *volume.shape[1:])
    weight_sum = torch.zeros(volume.shape[1:])
    starts = []
    for size, p in zip(volume.shape[1:], patch):  # nnU-Net's compute_steps_for_sliding_window, written out
        steps = -(-(size - p) // (p * step)) + 1
        starts.append([round((size - p) / (steps - 1) * i) for i in range(int(steps))])
    for z, y, x in itertools.product(*starts):
        window = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        total[(slice(None), *window)] += net(volume[(slice(None), *window)][None])[0] * weights
        weight_sum[window] += weights
    expected = total / weight_sum
    got = sliding_window_logits(volume, [net], patch, num_classes=2, step_size=step)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    whole = net(volume[None])[0]
    assert (got - whole).abs().max() > 1e-3  # the windows' borders do differ: the weighting is what is tested


class ConstantLogits:
    """Logits of `value` for every class and voxel (or inf): enough, over overlapping windows, to overflow a
    float16 sum (65,504 at most) while each window's own logits fit."""

    def __init__(self, value: float, classes: int = 2):
        self.value, self.classes = value, classes

    def __call__(self, patch):
        return torch.full((patch.shape[0], self.classes, *patch.shape[2:]), self.value, dtype=torch.float16)


def test_a_float16_sum_that_overflows_is_made_again_in_float32(caplog):
    """nnU-Net stops where the fp16 sum of logits overflows; we must neither stop nor return inf (argmax of inf and
    nan is no mask): the sum is made again in fp32, said in one line, and is the weighted mean it should be."""
    import logging

    volume, network = torch.zeros((1, 24, 24, 24)), ConstantLogits(60000.0)
    assert torch.isinf(_fp16_sum(volume, network)).any()  # the overflow is real
    with caplog.at_level(logging.WARNING, logger="inference"):
        logits = sliding_window_logits(volume, [network], (8, 8, 8), 2, step_size=0.25, dtype=torch.float16)
    assert "the float16 sum of the logits overflowed; summed again in float32" in caplog.text
    assert logits.dtype == torch.float32 and torch.allclose(logits, torch.full_like(logits, 60000.0))
    assert torch.equal(logits, sliding_window_logits(volume, [network], (8, 8, 8), 2, step_size=0.25,
                                                     dtype=torch.float32))


def _fp16_sum(volume, network):
    from inference.sliding_window import weighted_sum

    return weighted_sum(volume, [network], (8, 8, 8), 2, 0.25, (), torch.device("cpu"), False, 1, torch.float16)


def test_logits_that_are_not_finite_make_no_mask():
    volume = torch.zeros((1, 16, 16, 16))
    with pytest.raises(CaseError, match="the network's logits are not finite"):
        sliding_window_logits(volume, [ConstantLogits(float("inf"))], (8, 8, 8), 2)
    with pytest.raises(CaseError, match="not finite"):
        sliding_window_logits(volume, [ConstantLogits(float("nan"))], (8, 8, 8), 2, dtype=torch.float16)


def test_a_region_gets_the_logits_of_the_whole_volume_bit_for_bit_from_fewer_windows():
    """The exact crop's sliding window: the windows of the whole volume's grid that meet the region, summed in the
    same order, give every voxel inside it the whole run's logits exactly; outside, 0."""
    from inference.sliding_window import window_count
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, 3, padding=1).eval()

    def run(patch):
        with torch.no_grad():
            return network(patch)

    volume = torch.randn(1, 30, 41, 37)
    region = (slice(6, 19), slice(12, 30), slice(0, 9))
    whole = sliding_window_logits(volume, [run], (16, 16, 16), 2)
    part = sliding_window_logits(volume, [run], (16, 16, 16), 2, region=region)
    assert torch.equal(part[(slice(None), *region)], whole[(slice(None), *region)])
    outside = torch.ones_like(part, dtype=torch.bool)
    outside[(slice(None), *region)] = False
    assert not part[outside].any()
    assert window_count((30, 41, 37), (16, 16, 16), 0.5, region) < window_count((30, 41, 37), (16, 16, 16), 0.5)


def test_a_region_in_the_padded_volume_moves_only_along_the_axes_that_are_padded():
    from inference.sliding_window import padded_region
    volume = torch.zeros(1, 20, 100, 37)
    padded, unpad = pad_to_patch(volume, (40, 40, 40))
    region = (slice(2, 18), slice(30, 70), slice(0, 37))
    moved = padded_region(region, volume.shape[1:], (40, 40, 40))
    assert moved == (slice(12, 28), slice(30, 70), slice(1, 38))  # padded by 10 and 1; y (100 > 40) not at all
    assert all(m.start - r.start == u.start for m, r, u in zip(moved, region, unpad[1:]))
