"""run_metrics --overlays: the slices chosen, and the pictures written for every case."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from evaluation.overlays import (MIN_FALSE_POSITIVE_ML, choose_panels, edge_letters, largest_component_slice,
                                 overview_columns)

REPO = Path(__file__).resolve().parent.parent


def test_the_slices_go_through_the_largest_lesion_and_the_largest_false_positive():
    truth = np.zeros((20, 30, 30), bool)
    truth[3:6, 5:8, 5:8] = True              # small lesion
    truth[10:17, 10:20, 10:20] = True        # large lesion, widest...
    truth[14, 8:22, 8:22] = True             # ...at z = 14
    prediction = truth.copy()
    prediction[2, 25:28, 25:28] = True       # a false positive
    prediction[8:10, 0:4, 0:4] = True        # a larger false positive, widest at z = 8 (first of two)
    assert largest_component_slice(truth) == (14, int((truth[10:17].sum())))
    panels = choose_panels(truth, prediction)
    assert [(p.z, p.why) for p in panels] == [(14, "largest lesion"), (8, "largest false positive")]
    healthy = choose_panels(np.zeros_like(truth), np.zeros_like(truth))
    assert [(p.z, p.why) for p in healthy] == [(10, "middle slice (nothing to show)")]


def test_run_metrics_writes_a_picture_per_case_and_an_overview(tmp_path):
    images, labels, predictions = (tmp_path / name for name in ("images", "labels", "pred"))
    for folder in (images, labels, predictions):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for case, shift in (("one", 0), ("two", 3)):
        ct = sitk.GetImageFromArray((rng.normal(40, 20, (12, 40, 40))).astype(np.int16))
        truth = np.zeros((12, 40, 40), np.uint8)
        truth[4:8, 10:20, 10:20] = 1
        prediction = np.roll(truth, shift, axis=2)
        sitk.WriteImage(ct, str(images / f"{case}_0000.nii.gz"))
        for array, folder in ((truth, labels), (prediction, predictions)):
            image = sitk.GetImageFromArray(array)
            image.CopyInformation(ct)
            sitk.WriteImage(image, str(folder / f"{case}.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "evaluation.run_metrics", "--gt", labels, "--pred", predictions,
                             "-o", tmp_path / "metrics.csv", "--overlays", tmp_path / "pictures", "--workers", "1",
                             "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert written == ["one.png", "overview.png", "two.png"]
    assert all((tmp_path / "pictures" / name).stat().st_size > 10_000 for name in written)
    assert "wrote 3 picture(s)" in result.stdout
    table = result.stdout.splitlines()
    assert table[0].split() == ["case", "DSC", "NSD", "lesions", "found", "false", "positive", "ml"]
    assert table[1].split()[:2] == ["one", "1.00"] and "1 of 1" in table[1]


def test_a_false_positive_gets_a_panel_only_above_the_stated_size():
    truth = np.zeros((20, 30, 30), bool)
    truth[10:14, 10:14, 10:14] = True
    prediction = truth.copy()
    prediction[3, 25:27, 25:27] = True  # 4 voxels
    voxel_ml = MIN_FALSE_POSITIVE_ML / 8  # the false positive: half the size that earns a panel
    assert [p.why for p in choose_panels(truth, prediction, voxel_ml)] == ["largest lesion"]
    prediction[3:5, 25:27, 25:27] = True  # 8 voxels: exactly the size
    assert [p.why for p in choose_panels(truth, prediction, voxel_ml)] == ["largest lesion",
                                                                            "largest false positive (0.1 ml)"]


def test_the_edges_are_lettered_with_the_patients_sides_from_the_direction():
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # LPS: x to the patient's left, y to the back: radiological view
    assert edge_letters(identity) == {"right": "L", "left": "R", "bottom": "P", "top": "A"}
    flipped = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # RAS-stored: x to the right, y to the front
    assert edge_letters(flipped) == {"right": "R", "left": "L", "bottom": "A", "top": "P"}
    coronal = (1, 0, 0, 0, 0, 1, 0, -1, 0)  # rows run from head to feet
    assert edge_letters(coronal) == {"right": "L", "left": "R", "bottom": "I", "top": "S"}


def test_the_overview_has_as_many_columns_as_cases_up_to_four():
    assert [overview_columns(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 3, 4, 4, 4]
