"""Argmax / lesion-label mapping, resampling back, and the body crop."""
import numpy as np
import pytest
import torch

from inference.crop import body_bounding_box
from inference.postprocess import argmax_lesion_mask, lesion_label_ids, lesion_mask_at_shape
from inference.resample import shape_at_spacing


def test_lesion_label_mapping():
    labels = {"background": 0, "organ": 1, "lesion": 2}
    assert lesion_label_ids(labels, None) == (1, 2)
    assert lesion_label_ids(labels, (2,)) == (2,)
    with pytest.raises(ValueError, match="not in the model's labels"):
        lesion_label_ids(labels, (5,))
    logits = torch.zeros(3, 1, 1, 4)
    logits[0, ..., 0] = 1  # background wins
    logits[1, ..., 1] = 1  # organ wins
    logits[2, ..., 2] = 1  # lesion wins
    logits[:, ..., 3] = 1  # tie: argmax picks background
    assert argmax_lesion_mask(logits, (2,)).flatten().tolist() == [False, False, True, False]
    assert argmax_lesion_mask(logits, (1, 2)).flatten().tolist() == [False, True, True, False]


def test_two_class_margin_interpolation_equals_full_interpolation():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 11, 13)
    fast = lesion_mask_at_shape(logits, (20, 25, 31), (1,), "logits")
    full = torch.nn.functional.interpolate(logits[None], size=(20, 25, 31), mode="trilinear",
                                           align_corners=False)[0]
    assert fast.dtype == torch.uint8
    assert torch.equal(fast.bool(), full[1] > full[0])


@pytest.mark.parametrize("method", ["logits", "labels"])
def test_no_lesion_at_model_resolution_gives_the_zero_mask_the_resampling_would(method):
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 11, 13)
    logits[1] = logits[0] - torch.rand(9, 11, 13) * 1e-6  # background wins everywhere, by a hair
    logits[1, 4, 5, 6] = logits[0, 4, 5, 6]  # a tie goes to background too
    mask = lesion_mask_at_shape(logits, (20, 25, 31), (1,), method)
    margin = (logits[1] - logits[0])[None, None]
    if method == "logits":
        full = torch.nn.functional.interpolate(margin, size=(20, 25, 31), mode="trilinear", align_corners=False)
    else:
        full = torch.nn.functional.interpolate((margin > 0).float(), size=(20, 25, 31), mode="nearest")
    assert mask.shape == (20, 25, 31) and mask.dtype == torch.uint8
    assert mask.sum() == 0 and (full > 0).sum() == 0
    logits[1, 4, 5, 6] += 1e-3  # one lesion voxel: resampled as before
    assert lesion_mask_at_shape(logits, (20, 25, 31), (1,), method).sum() > 0


def test_labels_method_upsamples_nearest():
    logits = torch.zeros(2, 2, 2, 2)
    logits[1, 0, 0, 0] = 5
    mask = lesion_mask_at_shape(logits, (4, 4, 4), (1,), "labels")
    assert mask.sum() == 8 and mask[:2, :2, :2].all()


def test_shape_at_spacing_rounds_like_nnunet():
    assert shape_at_spacing((100, 512, 512), (2.5, 0.8, 0.8), (3.0, 3.0, 3.0)) == (83, 137, 137)


def make_body(shape=(60, 120, 120)):
    """Trunk with low-HU lungs inside, an arm separated by air, and a thin table below."""
    ct = np.full(shape, -1000, np.int16)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    trunk = ((y - 55) / 35.0) ** 2 + ((x - 55) / 40.0) ** 2 < 1
    ct[:, trunk[0]] = 40
    lungs = ((y - 50) / 20.0) ** 2 + ((x - 55) / 25.0) ** 2 < 1
    ct[10:50, lungs[0]] = -850
    ct[5:55, 40:70, 104:114] = 40  # an arm, separated from the trunk by air
    ct[:, 100:102, 10:100] = 0  # the scanner table
    return ct


def test_body_crop_keeps_trunk_lungs_and_arm_with_margin():
    ct = make_body()
    spacing = (2.0, 1.0, 1.0)
    box = body_bounding_box(ct, spacing, margin_mm=10.0)
    body = ct > -500
    for axis, sl in enumerate(box):
        occupied = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = int(np.ceil(10.0 / spacing[axis]))
        assert sl.start <= max(0, occupied[0] - margin)
        assert sl.stop >= min(ct.shape[axis], occupied[-1] + 1 + margin)
    assert box[2].stop >= 114  # the arm is kept


def test_body_crop_discards_small_debris_and_handles_all_air():
    ct = make_body()
    ct[0:2, 0:4, 0:4] = 500  # a speck of noise far from the body
    box = body_bounding_box(ct, (2.0, 1.0, 1.0), margin_mm=4.0)
    assert box[1].start >= 20 - 4 - 3  # body starts at y=20; margin 4 mm; coarse sampling step 4
    air = np.full((10, 20, 20), -1000, np.int16)
    assert body_bounding_box(air, (1.0, 1.0, 1.0)) == (slice(0, 10), slice(0, 20), slice(0, 20))


def test_the_model_space_region_holds_every_model_voxel_the_box_is_resampled_from():
    """Resampling back (trilinear, align_corners=False) reads, for input voxel i, the model voxels floor(c) and
    floor(c) + 1 around c = (i + 0.5) * model / input - 0.5: the region must hold them all, and little more."""
    from inference.crop import REGION_MARGIN, model_space_region
    assert model_space_region((slice(0, 10), slice(0, 20), slice(0, 30)), (10, 20, 30), (5, 10, 15), (0, 1, 2)) is None
    box, shape, model_shape = (slice(4, 8), slice(0, 20), slice(10, 21)), (10, 20, 30), (5, 40, 15)
    region = model_space_region(box, shape, model_shape, (2, 0, 1))  # the model's axes: x, z, y
    for model_axis, input_axis in enumerate((2, 0, 1)):
        size = model_shape[model_axis]
        read = set()
        for i in range(box[input_axis].start, box[input_axis].stop):
            c = max(0.0, (i + 0.5) * size / shape[input_axis] - 0.5)
            read |= {min(size - 1, int(np.floor(c))), min(size - 1, int(np.floor(c)) + 1)}
        assert region[model_axis].start <= min(read) and max(read) < region[model_axis].stop
        assert region[model_axis].stop - region[model_axis].start <= max(read) - min(read) + 2 + 2 * REGION_MARGIN


class CountingNetwork:
    """A network that counts its windows (backends.PatchNetwork)."""

    lanes, movable, source = 1, True, "counting"

    def __init__(self, network):
        self.network, self.calls = network, 0

    def accepted_patches(self):
        return self.network.accepted_patches()

    def on(self, device):
        return self

    def __call__(self, patch):
        self.calls += 1
        return self.network(patch)


def test_the_exact_crop_runs_only_the_bodys_windows_and_changes_no_voxel_inside_its_box(tmp_path):
    """A body with air around it: the crop runs fewer windows on the uncropped grid, and inside the body box the
    mask is the uncropped run's, voxel for voxel (outside it, 0). The toy model, untrained, marks much of the air:
    a crop that moved the grid would change its answer inside the box too."""
    from conftest import make_ct_image, make_toy_model
    from inference import PredictionSettings, load_model, predict_image, predict_image_with_report
    from inference.pipeline import crop_box
    import SimpleITK as sitk

    model = load_model(make_toy_model(tmp_path / "m", seed=3), device="cpu")
    counting = CountingNetwork(model.networks[0])
    model.networks = [counting]
    base = make_ct_image(shape_zyx=(24, 40, 48), seed=2)
    windows = []
    for pad, steps in (((4, 30, 30), (0.5, 0.7)), ((10, 5, 40), (0.5,)), ((2, 120, 120), (1.0,))):
        array = np.pad(sitk.GetArrayFromImage(base), [(p, p) for p in pad], constant_values=-1000)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(base.GetSpacing())
        for step in steps:
            counting.calls = 0
            cropped, report = predict_image_with_report(image, model, PredictionSettings(step_size=step))
            cropped = sitk.GetArrayFromImage(cropped)
            windows_cropped, counting.calls = counting.calls, 0
            assert report.windows == windows_cropped  # the report counts what ran
            full = sitk.GetArrayFromImage(predict_image(image, model, PredictionSettings(step_size=step, crop="none")))
            box = crop_box(array, tuple(image.GetSpacing())[::-1], PredictionSettings())
            assert np.array_equal(cropped[box], full[box]) and full[box].any()
            assert cropped.sum() == cropped[box].sum() < full.sum()  # 0 outside the box; the air had "lesions"
            windows.append((windows_cropped, counting.calls))
    assert all(cropped <= full for cropped, full in windows) and any(cropped < full for cropped, full in windows), \
        windows


def test_the_box_crop_is_the_run_on_the_cut_box_pasted_back(tmp_path):
    """The box crop predicts the body's box as if it were the whole image (resampled and tiled on its own) and pastes
    that mask back: 0 outside the box. On the toy model it is not the exact crop's answer (the windows moved),
    which is why only a calibration record chooses it."""
    from conftest import make_ct_image, make_toy_model
    from inference import PredictionSettings, load_model, predict_image
    from inference.pipeline import crop_box
    import SimpleITK as sitk

    model = load_model(make_toy_model(tmp_path / "m", seed=3), device="cpu")
    base = make_ct_image(shape_zyx=(24, 40, 48), seed=2)
    array = np.pad(sitk.GetArrayFromImage(base), [(3, 3), (20, 9), (25, 30)], constant_values=-1000)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(base.GetSpacing())
    box = crop_box(array, tuple(image.GetSpacing())[::-1], PredictionSettings())
    assert any(s.stop - s.start < n for s, n in zip(box, array.shape))
    cut = sitk.GetImageFromArray(array[box].copy())
    cut.SetSpacing(base.GetSpacing())
    alone = sitk.GetArrayFromImage(predict_image(cut, model, PredictionSettings(crop="none")))
    boxed = sitk.GetArrayFromImage(predict_image(image, model, PredictionSettings(crop="box")))
    exact = sitk.GetArrayFromImage(predict_image(image, model, PredictionSettings(crop="exact")))
    assert np.array_equal(boxed[box], alone) and alone.any() and boxed.sum() == alone.sum()
    assert not np.array_equal(boxed, exact)
