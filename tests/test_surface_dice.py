"""NSD: known-answer vectors and agreement with DeepMind's surface-distance (the test oracle)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from evaluation import surface_dice as sd

from surface_distance import lookup_tables as oracle_tables

oracle = pytest.importorskip("surface_distance")

METHODS = ("offsets", "edt")


def oracle_nsd(gt, pred, spacing, tolerance):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its scipy.ndimage.filters imports
        distances = oracle.compute_surface_distances(gt, pred, spacing)
    return float(oracle.compute_surface_dice_at_tolerance(distances, tolerance))


# ---------------------------------------------------------------------------------------------------
# Area tables


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (5.0, 0.7, 0.7), (0.8, 2.5, 0.6), (3, 2, 1)])
def test_area_table_matches_reference(spacing):
    ours = sd.surfel_area_table(spacing)
    reference = oracle_tables.create_table_neighbour_code_to_surface_area(spacing)
    assert ours.shape == (256,)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.0, 1.0), (0.7, 5.0)])
def test_contour_length_table_matches_reference(spacing):
    ours = sd.surfel_area_table(spacing)
    reference = oracle_tables.create_table_neighbour_code_to_contour_length(spacing)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)


def test_area_table_known_values():
    table = sd.surfel_area_table((1.0, 1.0, 1.0))
    assert table[0] == 0 and table[255] == 0
    # One corner voxel inside: the marching-cubes triangle cutting it, area sqrt(3)/8.
    assert table[1] == pytest.approx(math.sqrt(3) / 8, abs=1e-12)
    # Four voxels of one face inside (a flat face through the cell): area 1.
    assert table[0b00001111] == pytest.approx(1.0, abs=1e-12)
    # Anisotropic: that face is perpendicular to axis 0, so its area is s1 * s2.
    assert sd.surfel_area_table((5.0, 0.7, 0.8))[0b00001111] == pytest.approx(0.7 * 0.8, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Known answers (the reference's own test cases, written here as plain values)


@pytest.mark.parametrize("method", METHODS)
def test_two_voxels_2mm_apart_3d(method):
    gt = np.zeros((128, 128, 128), bool)
    pred = np.zeros_like(gt)
    gt[50, 60, 70] = True
    pred[50, 60, 72] = True
    # Each single-voxel surface is 8 corner surfels; at 1 mm spacing along x, half of each surface
    # is 1 mm from the other, half 2 mm.
    assert sd.surface_dice(gt, pred, (3, 2, 1), 1.0, method=method) == pytest.approx(0.5, abs=1e-12)
    gt_in, gt_all, pred_in, pred_all = sd.surface_overlap(gt, pred, (3, 2, 1), 1.0, method=method)
    assert gt_in / gt_all == pytest.approx(0.5) and pred_in / pred_all == pytest.approx(0.5)
    assert sd.surface_dice(gt, pred, (3, 2, 1), 2.0, method=method) == pytest.approx(1.0)
    assert sd.dice(gt, pred) == 0.0


def test_two_pixels_2mm_away_2d():
    gt = np.zeros((128, 128), bool)
    pred = np.zeros_like(gt)
    gt[50, 70] = True
    pred[50, 72] = True
    assert sd.surface_dice(gt, pred, (2, 1), 1.0) == pytest.approx(0.5, abs=1e-12)
    distances = sd.surface_distances(gt, pred, (2, 1))
    diagonal = 0.5 * math.sqrt(2 ** 2 + 1 ** 2)
    np.testing.assert_allclose(np.sort(distances["distances_gt_to_pred"]), [1, 1, 2, 2], atol=1e-6)
    np.testing.assert_allclose(distances["surfel_areas_gt"], [diagonal] * 4, atol=1e-12)


def test_two_squares_shifted_by_one_pixel_2d():
    gt = np.zeros((6, 6), bool)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3] = True
    pred[1:4, 1:3] = True
    vertical, horizontal = 2.0, 1.0
    diagonal = 0.5 * math.sqrt(vertical ** 2 + horizontal ** 2)
    # GT contour: 4 diagonals, 2 horizontals, 2 verticals, all within 1 mm of the prediction's.
    gt_length = 4 * diagonal + 2 * horizontal + 2 * vertical
    # Prediction contour: 4 diagonals, 2 horizontals, 4 verticals; the bottom diagonal, horizontal,
    # diagonal are 2 mm (one pixel along axis 0) from the GT contour.
    pred_length = 4 * diagonal + 2 * horizontal + 4 * vertical
    pred_far = 2 * diagonal + horizontal
    expected = (gt_length + pred_length - pred_far) / (gt_length + pred_length)
    assert sd.surface_dice(gt, pred, (vertical, horizontal), 1.0) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.870268, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_two_cubes_shifted_by_one_voxel(method):
    gt = np.zeros((100, 100, 100), bool)
    pred = np.zeros_like(gt)
    gt[0:50] = True
    pred[0:51] = True
    assert sd.surface_dice(gt, pred, (2, 1, 1), 1.0, method=method) == pytest.approx(0.836145, abs=1e-6)
    gt_in, gt_all, pred_in, pred_all = sd.surface_overlap(gt, pred, (2, 1, 1), 1.0, method=method)
    assert gt_in / gt_all == pytest.approx(0.842066, abs=1e-6)
    assert pred_in / pred_all == pytest.approx(0.830302, abs=1e-6)
    assert sd.dice(gt, pred) == pytest.approx(100 / 101, abs=1e-12)


@pytest.mark.parametrize("shape,spacing", [((128, 128, 128), (3, 2, 1)), ((128, 128), (3, 2))])
def test_empty_masks(shape, spacing):
    empty = np.zeros(shape, bool)
    one = empty.copy()
    one[(50, 60, 70)[: len(shape)]] = True
    assert sd.surface_dice(one, empty, spacing, 1.0) == 0.0
    assert sd.surface_dice(empty, one, spacing, 1.0) == 0.0
    assert math.isnan(sd.surface_dice(empty, empty, spacing, 1.0))
    assert sd.dice(one, empty) == 0.0 and math.isnan(sd.dice(empty, empty))
    distances = sd.surface_distances(one, empty, spacing)
    assert np.all(np.isinf(distances["distances_gt_to_pred"])) and distances["surfel_areas_pred"].size == 0


# ---------------------------------------------------------------------------------------------------
# Agreement with the oracle


def random_lesion(rng, shape):
    """A lumpy blob: a dilated seed grown into a thresholded smooth noise field nearby."""
    mask = np.zeros(shape, bool)
    mask[tuple(int(rng.integers(3, s - 3)) for s in shape)] = True
    mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 4)))
    noise = ndimage.gaussian_filter(rng.random(shape), 1.5)
    lumps = (noise > np.quantile(noise, 0.95)) & ndimage.binary_dilation(mask, iterations=3)
    return mask | lumps


SPACINGS = [(5.0, 0.7, 0.7), (2.5, 0.8, 0.8), (3.0, 0.9766, 0.9766), (1.25, 0.6, 0.6),
            (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), (4.0, 0.75, 1.1)]


def random_pairs(count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = (14, 36, 36)
        gt = random_lesion(rng, shape)
        kind = rng.integers(3)
        if kind == 0:  # shifted prediction
            pred = ndimage.shift(gt.astype(np.uint8), rng.integers(-2, 3, 3), order=0) > 0
        elif kind == 1:  # eroded or dilated
            op = ndimage.binary_erosion if rng.random() < 0.5 else ndimage.binary_dilation
            pred = op(gt) if gt.sum() > 30 else ndimage.binary_dilation(gt)
        else:  # an unrelated blob
            pred = random_lesion(rng, shape)
        spacing = SPACINGS[int(rng.integers(len(SPACINGS)))]
        yield gt, pred, spacing


def test_agrees_with_oracle_on_random_lesion_pairs():
    worst = 0.0
    count = 0
    for gt, pred, spacing in random_pairs(60, seed=7):
        reference = oracle_nsd(gt, pred, spacing, 2.0)
        for method in METHODS:
            ours = sd.surface_dice(gt, pred, spacing, 2.0, method=method)
            worst = max(worst, abs(ours - reference))
        count += 1
    assert count == 60
    assert worst <= 1e-6


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0, 3.0, 5.0])
def test_ties_at_the_tolerance_decided_like_the_oracle(tolerance):
    # Isotropic 1 mm voxels with integer shifts: many surfels lie at exactly the tolerance.
    gt = np.zeros((20, 20, 20), bool)
    gt[5:12, 6:13, 4:15] = True
    for shift in [(0, 0, 1), (0, 2, 0), (3, 0, 0), (1, 2, 2), (0, 3, 4)]:
        pred = np.roll(gt, shift, axis=(0, 1, 2))
        reference = oracle_nsd(gt, pred, (1.0, 1.0, 1.0), tolerance)
        for method in METHODS:
            assert sd.surface_dice(gt, pred, (1, 1, 1), tolerance, method=method) == pytest.approx(
                reference, abs=1e-9)


def test_surface_distances_agree_with_oracle():
    gt, pred, spacing = next(random_pairs(1, seed=3))
    ours = sd.surface_distances(gt, pred, spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = oracle.compute_surface_distances(gt, pred, spacing)
    for direction, areas in (("gt_to_pred", "gt"), ("pred_to_gt", "pred")):
        order = np.lexsort((ours["surfel_areas_" + areas], ours["distances_" + direction]))
        np.testing.assert_allclose(ours["distances_" + direction][order],
                                   reference["distances_" + direction], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours["surfel_areas_" + areas][order],
                                   reference["surfel_areas_" + areas], rtol=0, atol=1e-12)


def test_crop_and_dtype_do_not_change_the_result():
    gt, pred, spacing = next(random_pairs(1, seed=11))
    big_gt = np.zeros((30, 61, 53), np.uint8)
    big_pred = np.zeros_like(big_gt)
    big_gt[9:23, 17:53, 5:41] = gt
    big_pred[9:23, 17:53, 5:41] = pred
    assert sd.surface_dice(big_gt, big_pred, spacing) == pytest.approx(
        sd.surface_dice(gt, pred, spacing), abs=1e-12)


def test_union_bounding_box():
    a = np.zeros((7, 9, 13), np.uint8)
    b = np.zeros_like(a)
    a[2, 3, 4] = 1
    b[5, 1, 11] = 1
    assert sd.union_bounding_box(a, b) == (slice(2, 6), slice(1, 4), slice(4, 12))
    assert sd.union_bounding_box(np.zeros_like(a), np.zeros_like(a)) is None


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shape"):
        sd.surface_dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="2D or 3D"):
        sd.surface_dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1))


def test_auto_moves_unresolved_surfels_to_the_distance_transform(monkeypatch):
    # A 10 mm tolerance at 1 mm has ~4200 offsets; a predicted component 15 mm away from everything
    # stays unresolved through them, so "auto" hands it to the distance transform part-way.
    gt = np.zeros((24, 40, 40), bool)
    gt[6:14, 6:14, 6:14] = True
    pred = np.roll(gt, 2, axis=2)
    pred[18:22, 30:36, 30:36] = True
    calls = []
    original = sd._within_by_edt
    monkeypatch.setattr(sd, "_within_by_edt", lambda *args: calls.append(len(args[0])) or original(*args))
    reference = oracle_nsd(gt, pred, (1.0, 1.0, 1.0), 10.0)
    auto = sd.surface_dice(gt, pred, (1, 1, 1), 10.0, method="auto")
    pred_surfels = sd._surfaces(gt, pred, (1.0, 1.0, 1.0))[1][1].size
    assert len(calls) == 1 and 0 < calls[0] < pred_surfels  # only the far component's surfels went there
    for value in (auto, sd.surface_dice(gt, pred, (1, 1, 1), 10.0, method="offsets"),
                  sd.surface_dice(gt, pred, (1, 1, 1), 10.0, method="edt")):
        assert value == pytest.approx(reference, abs=1e-9)
    assert 0.5 < reference < 1.0
