"""FLARE rules, lesion-wise metrics, folder evaluation, summary and CSV output."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from evaluation import run_metrics as rm
from evaluation.lesion_metrics import lesion_metrics
from evaluation.surface_dice import surface_dice

REPO = Path(__file__).resolve().parent.parent
SPACING_ZYX = (2.0, 1.0, 1.0)  # one voxel = 2 mm^3 = 0.002 ml


def cube(shape=(12, 30, 30), *boxes, value=1):
    mask = np.zeros(shape, np.uint8)
    for box in boxes:
        mask[box] = value
    return mask


GT_BOX = np.s_[3:9, 8:20, 8:20]


# ---------------------------------------------------------------------------------------------------
# FLARE rules in score_case


def test_computed_case_matches_dice_and_surface_dice():
    gt = cube((12, 30, 30), GT_BOX)
    pred = cube((12, 30, 30), np.s_[3:9, 9:21, 8:20])
    result = rm.score_case(gt, pred, SPACING_ZYX)
    assert result["rule"] == "computed"
    assert result["Lesion_DSC"] == pytest.approx(2 * 6 * 11 * 12 / (2 * 6 * 12 * 12))
    assert result["Lesion_NSD"] == pytest.approx(surface_dice(gt, pred, SPACING_ZYX, 2.0), abs=1e-12)
    assert result["gt_volume_ml"] == pytest.approx(6 * 12 * 12 * 0.002)
    # The tolerance is passed through: a 1 mm shift is fully inside 2 mm but not inside 0.5 mm.
    assert result["Lesion_NSD"] == pytest.approx(1.0)
    tight = rm.score_case(gt, pred, SPACING_ZYX, tolerance_mm=0.5)
    assert tight["Lesion_NSD"] == pytest.approx(surface_dice(gt, pred, SPACING_ZYX, 0.5)) and \
        tight["Lesion_NSD"] < 1.0


def test_label_above_one_scores_zero():
    gt = cube((12, 30, 30), GT_BOX)
    pred = cube((12, 30, 30), GT_BOX)
    pred[4, 10, 10] = 2
    result = rm.score_case(gt, pred, SPACING_ZYX)
    assert (result["Lesion_DSC"], result["Lesion_NSD"], result["rule"]) == (0.0, 0.0, "label>1")
    off = rm.score_case(gt, pred, SPACING_ZYX, rules=rm.Rules(label_check=False))
    assert (off["Lesion_DSC"], off["Lesion_NSD"], off["rule"]) == (1.0, 1.0, "computed")
    # Labels are checked before the empty rules, as in the official script.
    assert rm.score_case(np.zeros_like(gt), pred * 2, SPACING_ZYX)["rule"] == "label>1"


def test_both_empty_scores_one():
    empty = np.zeros((12, 30, 30), np.uint8)
    result = rm.score_case(empty, empty, SPACING_ZYX)
    assert (result["Lesion_DSC"], result["Lesion_NSD"], result["rule"]) == (1.0, 1.0, "both_empty")
    assert result["healthy_fp"] == 0.0
    off = rm.score_case(empty, empty, SPACING_ZYX, rules=rm.Rules(both_empty=False))
    assert math.isnan(off["Lesion_DSC"]) and math.isnan(off["Lesion_NSD"])


@pytest.mark.parametrize("gt_empty", [True, False])
def test_exactly_one_empty_scores_zero(gt_empty):
    lesion = cube((12, 30, 30), GT_BOX)
    empty = np.zeros_like(lesion)
    gt, pred = (empty, lesion) if gt_empty else (lesion, empty)
    result = rm.score_case(gt, pred, SPACING_ZYX)
    assert (result["Lesion_DSC"], result["Lesion_NSD"], result["rule"]) == (0.0, 0.0, "one_empty")
    if gt_empty:
        assert result["healthy_fp"] == 1.0
    else:
        assert math.isnan(result["healthy_fp"])
    off = rm.score_case(gt, pred, SPACING_ZYX, rules=rm.Rules(one_empty=False, nsd_dsc_threshold=None))
    assert (off["Lesion_DSC"], off["Lesion_NSD"], off["rule"]) == (0.0, 0.0, "computed")


def test_low_dice_skips_nsd():
    gt = cube((12, 30, 30), np.s_[3:9, 8:20, 8:20])   # 864 voxels
    pred = cube((12, 30, 30), np.s_[3:9, 18:30, 8:20])  # 864 voxels, 2 rows of 12 shared
    dsc = 2 * 6 * 2 * 12 / (2 * 864)
    assert dsc == pytest.approx(1 / 6)
    result = rm.score_case(gt, pred, SPACING_ZYX)
    assert result["rule"] == "dsc<threshold"
    assert result["Lesion_DSC"] == pytest.approx(dsc) and result["Lesion_NSD"] == 0.0
    lower = rm.score_case(gt, pred, SPACING_ZYX, rules=rm.Rules(nsd_dsc_threshold=0.1))
    expected_nsd = surface_dice(gt, pred, SPACING_ZYX, 2.0)
    assert lower["rule"] == "computed" and expected_nsd > 0.2
    assert lower["Lesion_NSD"] == pytest.approx(expected_nsd, abs=1e-12)
    off = rm.score_case(gt, pred, SPACING_ZYX, rules=rm.Rules(nsd_dsc_threshold=None))
    assert off["Lesion_NSD"] == pytest.approx(expected_nsd, abs=1e-12)


def test_healthy_fp_flag():
    empty = np.zeros((12, 30, 30), np.uint8)
    speck = empty.copy()
    speck[5, 5, 5] = 1
    assert rm.score_case(empty, speck, SPACING_ZYX)["healthy_fp"] == 1.0
    assert rm.score_case(empty, empty, SPACING_ZYX)["healthy_fp"] == 0.0
    assert math.isnan(rm.score_case(speck, speck, SPACING_ZYX)["healthy_fp"])


# ---------------------------------------------------------------------------------------------------
# Lesion-wise metrics


def three_lesion_example():
    shape = (10, 30, 30)
    gt = cube(shape, np.s_[2:4, 2:5, 2:5],        # L1: 18 voxels, detected
              np.s_[2:4, 10:14, 10:14],          # L2: 32 voxels, detected
              np.s_[6:8, 20:25, 20:22])          # L3: 20 voxels, missed
    pred = cube(shape, np.s_[2:4, 3:6, 3:6],      # overlaps L1
                np.s_[3:5, 11:13, 11:13],        # overlaps L2
                np.s_[6:9, 2:4, 20:24])          # false positive: 24 voxels
    return gt, pred


def test_lesion_counts_and_volumes():
    gt, pred = three_lesion_example()
    metrics = lesion_metrics(gt, pred, SPACING_ZYX)
    assert metrics["gt_lesions"] == 3
    assert metrics["detected_lesions"] == 2
    assert metrics["missed_lesions"] == 1
    assert metrics["pred_components"] == 3
    assert metrics["fp_components"] == 1
    assert metrics["lesion_precision"] == pytest.approx(2 / 3)
    assert metrics["lesion_recall"] == pytest.approx(2 / 3)
    assert metrics["lesion_f1"] == pytest.approx(2 / 3)
    assert metrics["fp_volume_ml"] == pytest.approx(24 * 0.002)
    assert metrics["fn_volume_ml"] == pytest.approx(20 * 0.002)
    # score_case carries the same columns.
    row = rm.score_case(gt, pred, SPACING_ZYX)
    assert row["fp_components"] == 1 and row["fn_volume_ml"] == pytest.approx(0.04)


def test_one_prediction_covering_two_lesions():
    gt = cube((6, 20, 20), np.s_[2:4, 2:5, 2:5], np.s_[2:4, 8:11, 2:5])
    pred = cube((6, 20, 20), np.s_[2:4, 3:10, 3:4])
    metrics = lesion_metrics(gt, pred, SPACING_ZYX)
    assert (metrics["gt_lesions"], metrics["detected_lesions"], metrics["pred_components"]) == (2, 2, 1)
    assert metrics["lesion_precision"] == 1.0 and metrics["lesion_recall"] == 1.0
    assert metrics["fp_volume_ml"] == 0.0 and metrics["fn_volume_ml"] == 0.0


def test_connectivity():
    gt = np.zeros((4, 4, 4), np.uint8)
    gt[1, 1, 1] = gt[2, 2, 2] = 1  # touching at a corner only
    assert lesion_metrics(gt, gt, (1, 1, 1))["gt_lesions"] == 1
    assert lesion_metrics(gt, gt, (1, 1, 1), connectivity=6)["gt_lesions"] == 2


def test_lesion_edge_cases():
    empty = np.zeros((6, 10, 10), np.uint8)
    lesion = cube((6, 10, 10), np.s_[2:4, 2:4, 2:4])  # 8 voxels
    both = lesion_metrics(empty, empty, SPACING_ZYX)  # nothing to find, nothing found: undefined, not perfect
    assert all(math.isnan(both[m]) for m in ("lesion_precision", "lesion_recall", "lesion_f1"))
    assert both["gt_lesions"] == 0 and both["fp_volume_ml"] == 0.0
    only_pred = lesion_metrics(empty, lesion, SPACING_ZYX)
    assert only_pred["lesion_precision"] == 0.0 and math.isnan(only_pred["lesion_recall"])
    assert math.isnan(only_pred["lesion_f1"]) and only_pred["fp_volume_ml"] == pytest.approx(0.016)
    only_gt = lesion_metrics(lesion, empty, SPACING_ZYX)
    assert math.isnan(only_gt["lesion_precision"]) and only_gt["lesion_recall"] == 0.0
    assert only_gt["lesion_f1"] == 0.0 and only_gt["fn_volume_ml"] == pytest.approx(0.016)


# ---------------------------------------------------------------------------------------------------
# Folders, geometry, missing cases


def write(path: Path, array, spacing_xyz=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
          direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def folders(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    lesion = cube((12, 30, 30), GT_BOX)
    shifted = cube((12, 30, 30), np.s_[3:9, 9:21, 8:20])
    empty = np.zeros_like(lesion)
    speck = empty.copy()
    speck[1, 1, 1] = 1
    write(gt_dir / "good.nii.gz", lesion)
    write(pred_dir / "good.nii.gz", shifted)
    write(gt_dir / "healthy_clean.nii.gz", empty)
    write(pred_dir / "healthy_clean.mha", empty)  # other extensions are accepted
    write(gt_dir / "healthy_fp.nii.gz", empty)
    write(pred_dir / "healthy_fp.nii.gz", speck)
    write(gt_dir / "missing.nii.gz", lesion)
    write(pred_dir / "orphan.nii.gz", lesion)
    return gt_dir, pred_dir


def test_evaluate_folders(folders):
    gt_dir, pred_dir = folders
    messages = []
    per_case, summary = rm.evaluate_folders(gt_dir, pred_dir, workers=1, progress=False,
                                            log=messages.append)
    assert list(per_case["case"]) == ["good", "healthy_clean", "healthy_fp", "missing"]
    assert list(per_case.columns[:3]) == ["Name", "Lesion_DSC", "Lesion_NSD"]
    assert list(per_case["Name"]) == ["good.nii.gz", "healthy_clean.nii.gz", "healthy_fp.nii.gz",
                                      "missing.nii.gz"]
    rows = per_case.set_index("case")
    assert rows.loc["good", "Lesion_DSC"] == pytest.approx(11 / 12)
    assert rows.loc["healthy_clean", ["Lesion_DSC", "Lesion_NSD"]].tolist() == [1.0, 1.0]
    assert rows.loc["healthy_fp", ["Lesion_DSC", "Lesion_NSD"]].tolist() == [0.0, 0.0]
    # A GT case without prediction scores 0/0 and is flagged.
    assert rows.loc["missing", ["Lesion_DSC", "Lesion_NSD"]].tolist() == [0.0, 0.0]
    assert rows["missing"].tolist() == [False, False, False, True]
    assert (rows["error"] == "").all()
    # A prediction without GT is reported, not scored.
    assert len(messages) == 1 and "orphan.nii.gz" in messages[0] and "no ground truth" in messages[0]
    assert per_case.attrs["unmatched_predictions"] == [str(pred_dir / "orphan.nii.gz")]
    # Summary over the four cases; healthy false-positive rate over the two healthy ones.
    dsc = np.array([11 / 12, 1.0, 0.0, 0.0])
    assert summary.loc["Lesion_DSC", "n"] == 4
    assert summary.loc["Lesion_DSC", "mean"] == pytest.approx(dsc.mean())
    assert summary.loc["Lesion_DSC", "median"] == pytest.approx(np.median(dsc))
    assert summary.loc["healthy_fp_rate", "n"] == 2
    assert summary.loc["healthy_fp_rate", "mean"] == pytest.approx(0.5)
    # the speck: one voxel of 1 x 1 x 2 mm on one of the two healthy scans
    assert summary.loc["healthy_fp_ml", "n"] == 2 and summary.loc["healthy_fp_ml", "mean"] == pytest.approx(0.001)
    # lesion-wise detection over the lesion cases only: "good" found its lesion; the missing case counts as
    # nothing predicted (recall and F1 0: leaving a case out never scores better); precision only where something
    # was predicted
    assert rows.loc["missing", ["gt_lesions", "detected_lesions", "lesion_recall", "lesion_f1"]].tolist() == [1, 0, 0, 0]
    assert summary.loc["lesion_recall", "n"] == 2 and summary.loc["lesion_recall", "mean"] == 0.5
    assert summary.loc["lesion_f1", "n"] == 2 and summary.loc["lesion_f1", "mean"] == 0.5
    assert summary.loc["lesion_precision", "n"] == 1 and summary.loc["lesion_precision", "mean"] == 1.0


def test_parallel_workers_give_the_same_rows(folders):
    gt_dir, pred_dir = folders
    serial, _ = rm.evaluate_folders(gt_dir, pred_dir, workers=1, progress=False, log=lambda m: None)
    parallel, _ = rm.evaluate_folders(gt_dir, pred_dir, workers=2, progress=False, log=lambda m: None)
    pd.testing.assert_frame_equal(serial, parallel)


@pytest.mark.parametrize("change,expected", [
    ({"spacing_xyz": (1.0, 1.0, 2.5)}, "spacing (1, 1, 2.5) vs GT (1, 1, 2)"),
    ({"origin": (0.0, 5.0, 0.0)}, "origin (0, 5, 0) vs GT (0, 0, 0)"),
    ({"direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}, "direction"),
    ({"shape": (12, 30, 31)}, "size (31, 30, 12) vs GT (30, 30, 12)"),
])
def test_geometry_mismatch_is_an_error_for_that_case(tmp_path, change, expected):
    lesion = cube((12, 30, 30), GT_BOX)
    write(tmp_path / "gt" / "a.nii.gz", lesion)
    write(tmp_path / "pred" / "a.nii.gz", lesion)
    write(tmp_path / "gt" / "b.nii.gz", lesion)
    shape = change.pop("shape", lesion.shape)
    write(tmp_path / "pred" / "b.nii.gz", cube(shape, GT_BOX), **change)
    per_case, summary = rm.evaluate_folders(tmp_path / "gt", tmp_path / "pred", workers=1,
                                            progress=False)
    rows = per_case.set_index("case")
    error = rows.loc["b", "error"]
    assert str(tmp_path / "pred" / "b.nii.gz") in error and expected in error and "\n" not in error
    assert math.isnan(rows.loc["b", "Lesion_DSC"])
    assert rows.loc["a", "error"] == "" and rows.loc["a", "Lesion_DSC"] == 1.0
    assert summary.loc["Lesion_DSC", "n"] == 1  # the failed case is not averaged as a number


def test_geometry_within_tolerance_is_accepted(tmp_path):
    lesion = cube((12, 30, 30), GT_BOX)
    write(tmp_path / "gt" / "a.nii.gz", lesion, spacing_xyz=(0.8, 0.8, 2.0))
    write(tmp_path / "pred" / "a.nii.gz", lesion, spacing_xyz=(0.8005, 0.8, 2.0), origin=(0, 0, 5e-4))
    per_case, _ = rm.evaluate_folders(tmp_path / "gt", tmp_path / "pred", workers=1, progress=False)
    assert per_case.loc[0, "error"] == "" and per_case.loc[0, "Lesion_NSD"] == 1.0


def test_spacing_taken_from_gt_header_in_zyx_order(tmp_path):
    # Anisotropic spacing (x, y, z) = (0.5, 1, 4): the lesion's volume and NSD must use z = 4 mm.
    gt = cube((12, 30, 30), GT_BOX)
    pred = cube((12, 30, 30), np.s_[4:10, 8:20, 8:20])  # shifted by one slice = 4 mm
    write(tmp_path / "gt" / "a.nii.gz", gt, spacing_xyz=(0.5, 1.0, 4.0))
    write(tmp_path / "pred" / "a.nii.gz", pred, spacing_xyz=(0.5, 1.0, 4.0))
    per_case, _ = rm.evaluate_folders(tmp_path / "gt", tmp_path / "pred", workers=1, progress=False)
    assert per_case.loc[0, "gt_volume_ml"] == pytest.approx(6 * 12 * 12 * 2.0 / 1000)
    assert per_case.loc[0, "Lesion_NSD"] == pytest.approx(surface_dice(gt, pred, (4.0, 1.0, 0.5), 2.0))
    assert per_case.loc[0, "Lesion_NSD"] < 1.0


# ---------------------------------------------------------------------------------------------------
# Summary and CSV output


def test_summary_statistics():
    per_case = pd.DataFrame({
        "Lesion_DSC": [0.0, 0.5, 1.0, 1.0, 0.3],
        "Lesion_NSD": [0.0, 0.6, 1.0, 1.0, float("nan")],
        "healthy_fp": [float("nan"), 1.0, 0.0, 0.0, float("nan")],
        "error": ["", "", "", "", "x.nii.gz: broken"],
    })
    for column in rm.SUMMARY_METRICS[2:]:
        per_case[column] = float("nan")
    summary = rm.summarize(per_case)
    dsc = summary.loc["Lesion_DSC"]
    assert dsc["n"] == 4  # the error row is left out
    assert dsc["mean"] == pytest.approx(0.625)
    assert dsc["std"] == pytest.approx(math.sqrt(0.6875 / 4))  # population std
    assert dsc["median"] == pytest.approx(0.75)
    assert dsc["q1"] == pytest.approx(0.375) and dsc["q3"] == pytest.approx(1.0)
    assert summary.loc["Lesion_NSD", "mean"] == pytest.approx(0.65)
    assert summary.loc["lesion_f1", "n"] == 0 and math.isnan(summary.loc["lesion_f1", "mean"])
    assert summary.loc["healthy_fp_rate", "n"] == 3
    assert summary.loc["healthy_fp_rate", "mean"] == pytest.approx(1 / 3)
    assert list(summary.columns) == ["n", "mean", "std", "median", "q1", "q3"]


def test_cli_writes_csvs_and_exits_nonzero_on_errors(folders, tmp_path, capsys):
    gt_dir, pred_dir = folders
    out = tmp_path / "out" / "results.csv"
    assert rm.main(["--gt", str(gt_dir), "--pred", str(pred_dir), "-o", str(out), "--workers", "1",
                    "--no-progress"]) == 0
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(table.columns[:3]) == ["Name", "Lesion_DSC", "Lesion_NSD"]
    assert table.loc[0, "Name"] == "good.nii.gz"
    assert table.loc[0, "Lesion_DSC"] == f"{11 / 12:.4f}" == "0.9167"
    assert all(len(v.split(".")[1]) == 4 for v in table["Lesion_NSD"])
    assert table["missing"].tolist() == ["False", "False", "False", "True"]
    summary = pd.read_csv(tmp_path / "out" / "results_summary.csv", index_col=0)
    assert summary.loc["healthy_fp_rate", "mean"] == pytest.approx(0.5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.csv", "results_summary.csv"]
    printed = capsys.readouterr()
    assert "healthy_fp_rate" in printed.out and "1 of 2" in printed.out
    assert "missing" in printed.err and "orphan.nii.gz" in printed.err

    # Now one case on the wrong grid: named on stderr, the others still scored, exit code 1.
    write(pred_dir / "good.nii.gz", cube((12, 30, 30), GT_BOX), spacing_xyz=(1.0, 1.0, 3.0))
    assert rm.main(["--gt", str(gt_dir), "--pred", str(pred_dir), "-o", str(out), "--workers", "1",
                    "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"error: {pred_dir / 'good.nii.gz'}: geometry differs" in err
    table = pd.read_csv(out)
    assert table["Lesion_DSC"].isna().sum() == 1 and len(table) == 4


def test_cli_rejects_missing_folder(tmp_path, capsys):
    assert rm.main(["--gt", str(tmp_path / "nope"), "--pred", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_runs_as_a_script_with_workers(folders, tmp_path):
    gt_dir, pred_dir = folders
    out = tmp_path / "script.csv"
    done = subprocess.run([sys.executable, str(REPO / "evaluation" / "run_metrics.py"), "--gt", str(gt_dir),
                           "--pred", str(pred_dir), "-o", str(out), "--workers", "2", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(out)["Lesion_DSC"].round(4).tolist() == [0.9167, 1.0, 0.0, 0.0]
