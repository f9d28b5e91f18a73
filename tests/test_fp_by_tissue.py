"""experiments/fp_by_tissue.py: false-positive components matched to the phantoms' tissue map."""
import numpy as np
import pytest

from experiments.fp_by_tissue import eval_set_job, false_positive_components
from phantoms import BOWEL, LIVER, TISSUE_NAMES


def test_false_positives_are_named_by_their_majority_tissue():
    tissue = np.full((10, 12, 12), LIVER, np.uint8)
    tissue[:, :, 6:] = BOWEL
    hu = np.where(tissue == BOWEL, 30, 110).astype(np.int16)
    truth = np.zeros(tissue.shape, bool)
    truth[1:3, 1:3, 1:3] = True
    prediction = np.zeros(tissue.shape, bool)
    prediction[2:4, 2:4, 2:4] = True      # overlaps the truth: a true positive, not listed
    prediction[6:9, 6:9, 5:9] = True      # 9 voxels in the liver column x=5, 27 in bowel: bowel
    prediction[0, 11, 0] = True           # one liver voxel, on the first slice
    rows = sorted(false_positive_components(prediction, truth, tissue, hu, voxel_ml=0.5), key=lambda r: r["ml"])
    assert [r["tissue"] for r in rows] == [TISSUE_NAMES[LIVER], TISSUE_NAMES[BOWEL]]
    assert [r["ml"] for r in rows] == [0.5, 18.0]
    assert rows[1]["tissue_share"] == pytest.approx(27 / 36) and rows[1]["median_hu"] == 30
    assert rows[0]["height"] == 0.0 and rows[1]["height"] == pytest.approx(7 / 9)


def test_case_names_map_to_the_eval_sets_phantom_indices():
    assert eval_set_job("phantom_0012") == (12, False)
    assert eval_set_job("healthy_0003") == (5003, True)
    with pytest.raises(ValueError, match="case_1"):
        eval_set_job("case_1")
