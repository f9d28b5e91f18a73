"""run_metrics --overlays: the slices chosen, and the pictures written for every case."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from evaluation.overlays import choose_panels, largest_component_slice

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
