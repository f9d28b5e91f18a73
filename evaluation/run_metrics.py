"""FLARE-style lesion DSC / NSD plus lesion-wise detection metrics for a folder of predictions.

Usage:
    python -m evaluation.run_metrics --gt GT_DIR --pred PRED_DIR [-o results.csv] [--tolerance 2]
                                     [--workers N] [rule switches, see --help]

Per case (FLARE24 Task 1 rules, in the official order, each switchable):
  1. any prediction label outside {0, 1}        -> DSC 0, NSD 0
  2. GT and prediction both empty               -> DSC 1, NSD 1
  3. exactly one of them empty                  -> DSC 0, NSD 0
  4. DSC on the full volume; DSC < 0.2          -> NSD not computed, 0; else NSD at the tolerance (2 mm)
Spacing comes from the GT header. Writes the per-case CSV (starting with the official columns
Name, Lesion_DSC, Lesion_NSD) and `<out>_summary.csv`, prints the summary. See docs/metrics.md.

Python API: score_case(gt, pred, spacing_zyx, ...) -> dict, evaluate_folders(gt_dir, pred_dir, ...)
-> (per_case, summary), summarize(per_case) -> summary.
"""

from __future__ import annotations

import concurrent.futures
import json
import dataclasses
import multiprocessing
import os
import sys
from functools import partial
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script (python evaluation/run_metrics.py): run the installed package's module instead, whose
    # functions the worker processes can unpickle by their module path.
    from evaluation.run_metrics import main as _package_main

    sys.exit(_package_main())

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from evaluation.lesion_metrics import LESION_COLUMNS, lesion_metrics
from flare_common.arguments import OneLineParser, number, positive_int, program_name
from flare_common.files import atomic_path
from inference import CaseError
from inference.io import IMAGE_SUFFIXES, case_id, check_file_can_be_written, read_checked, split_suffix
from evaluation.surface_dice import surface_dice, union_bounding_box

GEOMETRY_TOLERANCE = 1e-3
OFFICIAL_COLUMNS = ["Name", "Lesion_DSC", "Lesion_NSD"]
EXTRA_COLUMNS = ["case", "missing", "error", "rule", "gt_volume_ml", "pred_volume_ml", "healthy_fp"]
PER_CASE_COLUMNS = OFFICIAL_COLUMNS + EXTRA_COLUMNS + LESION_COLUMNS
SUMMARY_METRICS = ["Lesion_DSC", "Lesion_NSD", "lesion_precision", "lesion_recall", "lesion_f1",
                   "gt_lesions", "detected_lesions", "fp_components", "fp_volume_ml", "fn_volume_ml"]
SUMMARY_COLUMNS = ["n", "mean", "std", "median", "q1", "q3"]


# A prediction file that cannot be read (corrupt, cut short, not an image) scores 0/0, like a missing one.
BROKEN_PREDICTION = "broken_prediction"


@dataclasses.dataclass(frozen=True)
class Rules:
    """The FLARE24 Task 1 scoring rules; each can be switched off.

    label_check: a prediction label outside {0, 1} scores 0/0 (off: any non-zero voxel is lesion).
    both_empty: GT and prediction empty score 1/1 (off: DSC and NSD are NaN, undefined).
    one_empty: exactly one empty scores 0/0 (off: computed like any other case, which gives 0/0 as
        well, DSC being 0 and the surface Dice with an empty surface 0; only `rule` differs).
    nsd_dsc_threshold: NSD is only computed when DSC >= this, else 0 (None: always computed).
    """

    label_check: bool = True
    both_empty: bool = True
    one_empty: bool = True
    nsd_dsc_threshold: float | None = 0.2


FLARE24 = Rules()


def score_case(gt: np.ndarray, pred: np.ndarray, spacing_zyx, tolerance_mm: float = 2.0,
               rules: Rules = FLARE24, *, lesion_wise: bool = True, connectivity: int = 26,
               threads: int | None = None) -> dict:
    """Score one case: Lesion_DSC, Lesion_NSD, the rule that decided them, volumes, lesion-wise metrics.

    `gt`, `pred`: arrays of the same shape, (z, y, x); GT non-zero = lesion. `spacing_zyx`: mm.
    `rule` in the result is one of: label>1, both_empty, one_empty, dsc<threshold, computed.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"GT shape {gt.shape} and prediction shape {pred.shape} differ")
    spacing_zyx = tuple(float(s) for s in spacing_zyx)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0

    # Everything below depends on non-zero voxels only, and the bounding box of their union holds all
    # of them (label values included): crop first, so that only this one pass reads the whole volume.
    box = union_bounding_box(gt, pred)
    if box is None:
        gt = pred = np.zeros((0,) * gt.ndim, bool)
        bad_label = False
    else:
        gt, pred = gt[box], pred[box]
        bad_label = bool(pred.max() > 1 or pred.min() < 0)
        gt, pred = gt != 0, pred != 0
    gt_voxels, pred_voxels = int(np.count_nonzero(gt)), int(np.count_nonzero(pred))

    result = {"gt_volume_ml": gt_voxels * voxel_ml, "pred_volume_ml": pred_voxels * voxel_ml}
    if rules.label_check and bad_label:
        result.update(rule="label>1", Lesion_DSC=0.0, Lesion_NSD=0.0)
    elif gt_voxels == 0 and pred_voxels == 0:
        value = 1.0 if rules.both_empty else float("nan")
        result.update(rule="both_empty", Lesion_DSC=value, Lesion_NSD=value)
    elif rules.one_empty and (gt_voxels == 0 or pred_voxels == 0):
        result.update(rule="one_empty", Lesion_DSC=0.0, Lesion_NSD=0.0)
    else:
        dsc = 2.0 * int(np.count_nonzero(gt & pred)) / (gt_voxels + pred_voxels)
        if rules.nsd_dsc_threshold is not None and dsc < rules.nsd_dsc_threshold:
            result.update(rule="dsc<threshold", Lesion_DSC=dsc, Lesion_NSD=0.0)
        else:
            nsd = surface_dice(gt, pred, spacing_zyx, tolerance_mm, threads=threads)
            result.update(rule="computed", Lesion_DSC=dsc, Lesion_NSD=nsd)

    result["healthy_fp"] = float(pred_voxels > 0) if gt_voxels == 0 else float("nan")
    if lesion_wise:
        result.update(lesion_metrics(gt, pred, spacing_zyx, connectivity=connectivity))
    return result


# ----------------------------------------------------------------------------------------------------
# Folders


def files_by_case(folder) -> dict[str, list[Path]]:
    """Case name -> the label or prediction files of that name (normally one) in `folder`: `<case>` and an
    image suffix the engine reads (inference.io), hidden files left out."""
    cases: dict[str, list[Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        name, suffix = split_suffix(path.name)
        if suffix and name and not path.name.startswith(".") and path.is_file():
            cases.setdefault(name, []).append(path)
    return cases


def _read(path: Path) -> sitk.Image:
    """The engine's checked read (inference.io.read_checked): a truncated NIfTI (which ITK reads as if the
    missing voxels were zeros), a header that declares more than the file holds, a name SimpleITK cannot take."""
    return read_checked(path)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def geometry_mismatch(gt: sitk.Image, pred: sitk.Image, tolerance: float = GEOMETRY_TOLERANCE) -> str:
    """'' if the prediction is on the GT's grid, else what differs (size, spacing, origin, direction)."""
    problems = []
    if gt.GetSize() != pred.GetSize():
        problems.append(f"size {pred.GetSize()} vs GT {gt.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        p, g = getattr(pred, "Get" + what)(), getattr(gt, "Get" + what)()
        if np.max(np.abs(np.subtract(p, g))) > tolerance:
            problems.append(f"{what.lower()} {_fmt(p)} vs GT {_fmt(g)}")
    return "; ".join(problems)


def _empty_row(case: str) -> dict:
    row = {column: float("nan") for column in PER_CASE_COLUMNS}
    row.update(Name=f"{case}.nii.gz", case=case, missing=False, error="", rule="")
    return row


def evaluate_case(case: str, gt_path: Path, pred_paths: list[Path], tolerance_mm: float = 2.0,
                  rules: Rules = FLARE24, connectivity: int = 26, threads: int | None = None) -> dict:
    """One per-case CSV row. Missing prediction: 0/0 with missing=True. Bad input: `error` set."""
    row = _empty_row(case)
    try:
        if not pred_paths:
            row.update(missing=True, Lesion_DSC=0.0, Lesion_NSD=0.0, rule="missing")
            score_as_nothing_predicted(row, _read(gt_path), connectivity)
            return row
        if len(pred_paths) > 1:
            raise CaseError(f"{pred_paths[0].parent}: several predictions for case {case}: "
                            + ", ".join(p.name for p in pred_paths))
        pred_path = pred_paths[0]
        gt_image = _read(gt_path)
        try:
            pred_image = _read(pred_path)
        except CaseError as error:
            # As the organisers score a missing output: 0/0, counted in the means (a broken file must not
            # score better than no file); the reason stays in `error`.
            row.update(Lesion_DSC=0.0, Lesion_NSD=0.0, rule=BROKEN_PREDICTION, error=str(error))
            score_as_nothing_predicted(row, gt_image, connectivity)
            return row
        mismatch = geometry_mismatch(gt_image, pred_image)
        if mismatch:
            raise CaseError(f"{pred_path}: geometry differs from {gt_path.name}: {mismatch}")
        spacing_zyx = gt_image.GetSpacing()[::-1]  # SimpleITK gives (x, y, z); arrays are (z, y, x)
        row.update(score_case(sitk.GetArrayViewFromImage(gt_image), sitk.GetArrayViewFromImage(pred_image),
                              spacing_zyx, tolerance_mm, rules, connectivity=connectivity,
                              threads=threads))
    except CaseError as error:
        row["error"] = str(error)
    return row


def score_as_nothing_predicted(row: dict, gt_image: sitk.Image, connectivity: int) -> None:
    """The lesion-wise metrics of a case without a (readable) prediction, as if nothing had been predicted: its
    lesions are missed in recall and F1, so that leaving out a hard case never scores better than a bad mask
    (whether a lesion-free scan would have had a false positive stays unknown: no healthy-scan row)."""
    gt = sitk.GetArrayViewFromImage(gt_image) != 0
    row.update(lesion_metrics(gt, np.zeros_like(gt), gt_image.GetSpacing()[::-1], connectivity=connectivity))


def _pool_context():
    # Not fork: the caller (a training script) may hold threads, which fork does not copy safely.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def evaluate_folders(gt_dir, pred_dir, tolerance: float = 2.0, workers: int | None = None,
                     rules: Rules = FLARE24, connectivity: int = 26, progress: bool = True,
                     log=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every GT case in `gt_dir` against `pred_dir`; returns (per_case, summary) DataFrames.

    per_case: one row per GT case, columns PER_CASE_COLUMNS, sorted by case; rows with a non-empty
    `error` have NaN metrics and are left out of the summary, except an unreadable prediction, which scores
    0/0 like a missing one (rule `broken_prediction`, the reason in `error`). Predictions without a GT file are reported
    through `log` (default: print to stderr) and listed in per_case.attrs["unmatched_predictions"].
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    gt_cases, pred_cases = files_by_case(gt_dir), files_by_case(pred_dir)
    unmatched = sorted(set(pred_cases) - set(gt_cases))
    for case in unmatched:
        log(f"warning: {pred_cases[case][0]}: no ground truth for this prediction in {gt_dir}, ignored")
    workers = max(1, int(workers or default_workers()))
    threads = max(1, (os.cpu_count() or 1) // workers)

    rows, jobs = [], []
    for case, gt_paths in sorted(gt_cases.items()):
        if len(gt_paths) > 1:
            row = _empty_row(case)
            row["error"] = (f"{gt_paths[0].parent}: several ground-truth files for case {case}: "
                            + ", ".join(p.name for p in gt_paths))
            rows.append(row)
        else:
            jobs.append((case, gt_paths[0], pred_cases.get(case, []), tolerance, rules, connectivity,
                         threads))

    with tqdm(total=len(jobs), desc="metrics", unit="case", disable=not (progress and sys.stderr.isatty())) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                rows.append(evaluate_case(*job))
                bar.update()
        else:
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                                        mp_context=_pool_context()) as pool:
                futures = [pool.submit(evaluate_case, *job) for job in jobs]
                for future in concurrent.futures.as_completed(futures):
                    rows.append(future.result())
                    bar.update()

    per_case = pd.DataFrame(rows, columns=PER_CASE_COLUMNS)
    per_case = per_case.sort_values("case", kind="stable").reset_index(drop=True)
    per_case["missing"] = per_case["missing"].astype(bool)
    per_case.attrs["unmatched_predictions"] = [str(pred_cases[c][0]) for c in unmatched]
    return per_case, summarize(per_case)


LESION_CASE_METRICS = ("lesion_precision", "lesion_recall", "lesion_f1")  # summarised over lesion cases only


def summarize(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per metric: n (cases with a value), mean, std (population, ddof=0), median, q1, q3.

    Error rows are left out; NaN values (undefined metrics) are skipped. Lesion-wise precision, recall and F1 are
    over the cases with a lesion in the truth only. The healthy-scan rows are over the lesion-free cases with a
    prediction: healthy_fp_rate, the share of them with any predicted lesion voxel (n = such cases, mean = the
    rate), and healthy_fp_ml, the predicted (all false-positive) volume in ml on each.
    """
    valid = per_case
    if "error" in per_case:
        scored = per_case["error"].fillna("") == ""
        if "rule" in per_case:
            scored |= per_case["rule"] == BROKEN_PREDICTION
        valid = per_case[scored]
    lesion_cases = valid[pd.to_numeric(valid["gt_lesions"], errors="coerce") > 0]
    healthy_cases = valid[pd.to_numeric(valid["healthy_fp"], errors="coerce").notna()]
    columns = {metric: (lesion_cases if metric in LESION_CASE_METRICS else valid)[metric]
               for metric in SUMMARY_METRICS}
    columns["healthy_fp_rate"] = healthy_cases["healthy_fp"]
    columns["healthy_fp_ml"] = healthy_cases["fp_volume_ml"]
    table = {}
    for metric, column in columns.items():
        values = pd.to_numeric(column, errors="coerce").dropna().to_numpy(np.float64)
        if values.size:
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            table[metric] = [values.size, values.mean(), values.std(), median, q1, q3]
        else:
            table[metric] = [0] + [float("nan")] * 5
    table["healthy_fp_rate"][2:] = [float("nan")] * 4  # a rate: its spread and quartiles say nothing
    summary = pd.DataFrame.from_dict(table, orient="index", columns=SUMMARY_COLUMNS)
    summary["n"] = summary["n"].astype(int)
    summary.index.name = "metric"
    return summary


# ----------------------------------------------------------------------------------------------------
# Output


def summary_path(output: Path) -> Path:
    """`results.csv` -> `results_summary.csv`, beside it."""
    output = Path(output)
    stem = output.name[:-4] if output.name.lower().endswith(".csv") else output.name
    return output.with_name(stem + "_summary.csv")


def _write_atomically(frame: pd.DataFrame, path: Path, **to_csv) -> None:
    # a case name that is not UTF-8 (a latin-1 file name, legal on Linux) is written with its bytes escaped
    with atomic_path(path) as written:
        frame.to_csv(written, errors="backslashreplace", **to_csv)


def write_results(per_case: pd.DataFrame, summary: pd.DataFrame, output) -> tuple[Path, Path]:
    """Per-case CSV (official columns with 4 decimals, as the FLARE script) and the summary CSV."""
    out = per_case.copy()
    for column in ("Lesion_DSC", "Lesion_NSD"):
        out[column] = [("" if pd.isna(v) else f"{v:.4f}") for v in out[column]]
    _write_atomically(out, output, index=False, float_format="%.6g")
    summary_file = summary_path(output)
    _write_atomically(summary, summary_file, float_format="%.6g")
    return Path(output), summary_file


# ----------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=program_name("evaluation.run_metrics", "flare-metrics"),
        description="FLARE24-style lesion DSC/NSD and lesion-wise metrics for a folder of predictions.")
    parser.add_argument("--gt", required=True, type=Path, help="ground-truth folder (<case>.nii.gz)")
    parser.add_argument("--pred", required=True, type=Path,
                        help="prediction folder (<case>.nii.gz; .nii, .mha, .nrrd accepted)")
    parser.add_argument("-o", "--output", type=Path, default=Path("results.csv"),
                        help="per-case CSV (default results.csv); the summary goes to <out>_summary.csv")
    parser.add_argument("--tolerance", type=partial(number, low=0), default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="parallel processes (default min(4, CPU count))")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26,
                        help="connectivity of lesion components (default 26)")
    rules = parser.add_argument_group("FLARE24 rules (all on by default)")
    rules.add_argument("--no-label-check", action="store_true",
                       help="do not score predictions with labels outside {0,1} as 0/0")
    rules.add_argument("--no-both-empty-rule", action="store_true",
                       help="both empty: NaN instead of DSC 1, NSD 1")
    rules.add_argument("--no-one-empty-rule", action="store_true",
                       help="exactly one empty: compute instead of setting 0/0")
    rules.add_argument("--nsd-dsc-threshold", type=partial(number, low=0, high=1), default=0.2,
                       help="NSD is set to 0 without computing it when DSC < this (default 0.2)")
    rules.add_argument("--no-dsc-threshold", action="store_true", help="always compute NSD")
    pictures = parser.add_argument_group("pictures and the per-case table")
    pictures.add_argument("--overlays", type=Path, default=None, metavar="DIR",
                          help="write DIR/<case>.png (the slices through the largest lesion and the largest "
                               "false positive, truth and prediction outlined) and DIR/overview.png")
    pictures.add_argument("--images", type=Path, default=None, metavar="DIR",
                          help="the CT images (<case>_0000.nii.gz) the overlays are drawn on (default: the "
                               "images/ folder beside --gt)")
    pictures.add_argument("--timings", type=Path, default=None, metavar="JSON",
                          help="the engine's --timings file: adds each case's seconds to the printed table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def case_table(per_case: pd.DataFrame, timings: Path | None = None) -> str:
    """The printed per-case table: scores, lesions found of those in the truth, false-positive ml, seconds."""
    table = pd.DataFrame({
        "case": per_case["case"],
        "DSC": per_case["Lesion_DSC"], "NSD": per_case["Lesion_NSD"],
        "lesions found": [f"{int(d)} of {int(g)}" if g == g and d == d else "-"
                          for d, g in zip(per_case["detected_lesions"], per_case["gt_lesions"])],
        "false positive ml": per_case["fp_volume_ml"]})
    if timings is not None:
        seconds = {case_id(Path(name)): entry.get("total")
                   for name, entry in json.loads(Path(timings).read_text()).get("cases", {}).items()}
        table["seconds"] = [seconds.get(case) for case in table["case"]]
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")


def output_problem(args) -> str | None:
    """What stops the results from being written or read, found before any case is scored: -o (and its summary)
    naming a folder or lying in a folder that cannot be written, --overlays naming a file, a --timings file that
    is not the engine's JSON."""
    for path in (args.output, summary_path(args.output)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_file_can_be_written(path, "-o")
        except (CaseError, OSError) as error:
            return str(error) if isinstance(error, CaseError) else f"{path}: -o: {error.strerror or error}"
    if args.overlays is not None and args.overlays.exists() and not args.overlays.is_dir():
        return f"{args.overlays}: --overlays names a file, not a folder"
    if args.timings is not None:
        try:
            cases = json.loads(args.timings.read_text()).get("cases")
            if not isinstance(cases, dict):
                raise ValueError("no 'cases' object")
        except (OSError, ValueError, AttributeError) as error:
            return f"{args.timings}: --timings is not the engine's timings JSON ({error})"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")  # case names that are not UTF-8, printed escaped
    for name, folder in (("--gt", args.gt), ("--pred", args.pred)):
        if not folder.is_dir():
            print(f"error: {folder}: {name} folder does not exist", file=sys.stderr)
            return 2
    problem = output_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rules = Rules(label_check=not args.no_label_check, both_empty=not args.no_both_empty_rule,
                  one_empty=not args.no_one_empty_rule,
                  nsd_dsc_threshold=None if args.no_dsc_threshold else args.nsd_dsc_threshold)
    per_case, summary = evaluate_folders(args.gt, args.pred, tolerance=args.tolerance,
                                         workers=args.workers, rules=rules,
                                         connectivity=args.connectivity,
                                         progress=not args.no_progress)
    if per_case.empty:
        print(f"error: {args.gt}: no ground-truth images ({', '.join(IMAGE_SUFFIXES)})",
              file=sys.stderr)
        return 1
    case_file, summary_file = write_results(per_case, summary, args.output)

    print(case_table(per_case, args.timings))
    print()
    print(summary.rename_axis(None).to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))
    healthy, healthy_ml = summary.loc["healthy_fp_rate"], summary.loc["healthy_fp_ml"]
    if healthy["n"]:
        print(f"healthy scans: {int(round(healthy['mean'] * healthy['n']))} of {int(healthy['n'])} with a false "
              f"positive (rate {healthy['mean']:.4f}), {healthy_ml['mean']:.2f} ml of false positives a scan")
    sys.stdout.flush()
    # what went wrong, before the closing lines: a warning after "wrote ..." is easily missed
    for case in per_case.loc[per_case["missing"], "case"]:
        print(f"warning: {args.pred}: no prediction for case {case}, scored 0/0 (missing)",
              file=sys.stderr)
    errors = [e for e in per_case["error"] if isinstance(e, str) and e]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    sys.stderr.flush()
    if args.overlays is not None:
        from evaluation.overlays import write_overlays

        images = args.images or args.gt.parent / "images"
        pictures = write_overlays(per_case, images, args.gt, args.pred, args.overlays)
        print(f"wrote {len(pictures)} picture(s) to {args.overlays} (overview: {args.overlays / 'overview.png'})"
              if pictures else f"warning: no picture: no CT image of the cases in {images}")
    print(f"wrote {case_file} and {summary_file}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
