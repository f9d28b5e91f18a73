"""experiments/resolution_ceiling.py: what a perfect model at a given spacing scores through the engine."""
import json

import numpy as np
import pytest

from experiments.resolution_ceiling import main, perfect_predictions
from evaluation.surface_dice import dice


def body_with_lesions(shape=(40, 48, 48)):
    """A body (0 HU) in air, a 20 mm sphere and a 1-voxel lesion, at 1 mm."""
    image = np.full(shape, -1000, np.int16)
    image[2:-2, 4:-4, 4:-4] = 0
    z, y, x = np.indices(shape)
    label = (((z - 20) ** 2 + (y - 24) ** 2 + (x - 20) ** 2) <= 10 ** 2).astype(np.uint8)
    label[20, 24, 38] = 1
    return image, label


def test_at_the_scans_own_spacing_the_perfect_model_is_the_truth():
    image, label = body_with_lesions()
    for name, mask in perfect_predictions(image, label, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)).items():
        assert mask.dtype == np.uint8 and mask.shape == label.shape
        assert np.array_equal(mask, label), name


def test_coarse_spacing_keeps_the_large_lesion_and_loses_the_one_voxel_lesion():
    image, label = body_with_lesions()
    masks = perfect_predictions(image, label, (1.0, 1.0, 1.0), (4.0, 4.0, 4.0))
    sphere = label.copy()
    sphere[20, 24, 38] = 0
    for name, mask in masks.items():
        assert mask[20, 24, 38] == 0, name              # 1 mm^3 of a 64 mm^3 voxel: gone
        assert 0.85 < dice(sphere, mask) < 1.0, name     # the sphere survives, with coarse edges
    # occupancy is the better perfect model: no point sampling between the model's voxel centres
    assert dice(sphere, masks["occupancy"]) >= dice(sphere, masks["target"]) - 1e-9


def test_lesions_outside_the_body_crop_are_lost_as_in_the_engine():
    image, label = body_with_lesions()
    image[:, :, 30:] = -1000                             # the body ends at x = 29; crop margin 10 mm
    label[20, 24, 46] = 1                                # 17 mm outside the body
    masks = perfect_predictions(image, label, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert masks["target"][20, 24, 46] == 0 and masks["target"][20, 24, 38] == 1


def test_benchmark_writes_results_for_every_spacing_and_perfect_model(tmp_path):
    assert main(["--seed", "3", "--cases", "2", "--healthy", "0", "--shape", "48", "64", "64",
                 "--spacings", "3", "2", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "resolution_ceiling.json").read_text())
    assert [(r["perfect_model"], r["spacing_mm"]) for r in result["summary"]] == [
        ("occupancy", 2.0), ("occupancy", 3.0), ("target", 2.0), ("target", 3.0)]
    assert len(result["per_case"]) == 2 * 2 * 2
    assert result["model_on_same_cases"] is None       # not the committed evaluation set
    for row in result["summary"]:
        assert 0.0 <= row["Lesion_DSC"] <= 1.0 and 0.0 <= row["Lesion_NSD"] <= 1.0
    assert "--shape 48 64 64 --spacings 2 3" in result["command"]
    assert (tmp_path / "resolution_ceiling.png").stat().st_size > 0
    assert "| target | 3 |" in (tmp_path / "resolution_ceiling.md").read_text()


def test_spacings_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        main(["--spacings", "0", "--work", str(tmp_path)])
