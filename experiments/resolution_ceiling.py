"""What a perfect model at a given spacing would score: the resolution ceiling of lesion DSC and NSD.

    python experiments/resolution_ceiling.py [--seed 7] [--spacings 2 2.5 3 4]

A model at spacing s mm sees and predicts the case resampled to s, and the engine brings its logits back
to the scan's grid. This benchmark replaces the network with the truth at that spacing and sends it
through the engine's own stages. These are: the body crop (`inference.pipeline.crop_box`); the model-space
shape (`inference.resample.shape_at_spacing`); trilinear resampling of the two-class logits back to the
cropped grid, then argmax (`inference.postprocess.lesion_mask_at_shape`); and the paste into the full
volume. Two perfect models:

  target     the training target of training/train_default.py: the label resampled trilinearly, > 0.5.
             A network that learned its targets exactly scores this.
  occupancy  the lesion fraction of each model voxel (area average) as its probability: the best any
             model at that spacing can do through the engine's resampling back.

Each mask is scored by `evaluation.run_metrics.score_case` (FLARE rules, NSD at 2 mm) against the
full-resolution truth. The cases are the evaluation phantoms of eval_default_model, reused from its work
folder, so the model's committed per-case scores (results/default_model_quality.json) sit beside them.
Healthy cases are not scored: an empty truth stays empty at every spacing, so a perfect model scores 1 on
them. Writes experiments/results/resolution_ceiling.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.eval_default_model import GOALS
from phantoms import write_eval_set
from flare_common.files import write_text_atomically
from flare_common.results import EXPERIMENT_RESULTS, RESULTS
from flare_common.machine import machine_facts
from evaluation.run_metrics import score_case
from inference import PredictionSettings
from inference.model import read_model_config
from inference.pipeline import crop_box
from inference.postprocess import lesion_mask_at_shape
from inference.resample import shape_at_spacing
from training.train_default import training_target

REPO = Path(__file__).resolve().parent.parent


SCORE_COLUMNS = ["Lesion_DSC", "Lesion_NSD", "lesion_recall", "lesion_precision"]


def model_space_truth(cropped_label: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Lesion probability [1, z, y, x] at the model's grid for each perfect model (see the docstring)."""
    return {"target": training_target(cropped_label[0], shape)[None].float(),
            "occupancy": F.interpolate(cropped_label[None], size=shape, mode="area")[0]}


def perfect_predictions(image: np.ndarray, label: np.ndarray, spacing: tuple[float, ...],
                        model_spacing: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Full-size uint8 masks a perfect model at `model_spacing` yields through the engine's stages."""
    box = crop_box(image, spacing, PredictionSettings())
    cropped = torch.from_numpy(np.ascontiguousarray(label[box] > 0)).float()[None]
    shape = shape_at_spacing(tuple(cropped.shape[1:]), spacing, model_spacing)
    masks = {}
    for name, lesion in model_space_truth(cropped, shape).items():
        logits = torch.cat([1.0 - lesion, lesion])
        full = np.zeros(label.shape, np.uint8)
        full[box] = lesion_mask_at_shape(logits, tuple(cropped.shape[1:]), (1,), "logits").numpy()
        masks[name] = full
    return masks


def score_perfect_models(data: Path, entries: list[dict], spacings: list[float]) -> pd.DataFrame:
    """One row per lesion case, spacing and perfect model."""
    rows = []
    lesion_cases = [e for e in entries if e["lesions"]]
    for entry in tqdm(lesion_cases, desc="cases", unit="case"):
        image = sitk.ReadImage(str(data / "images" / f"{entry['case']}_0000.nii.gz"))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labels" / f"{entry['case']}.nii.gz")))
        array = sitk.GetArrayViewFromImage(image)
        spacing = tuple(image.GetSpacing())[::-1]
        for model_spacing in spacings:
            masks = perfect_predictions(array, label, spacing, (model_spacing,) * 3)
            for name, mask in masks.items():
                score = score_case(label, mask, spacing, tolerance_mm=2.0)
                rows.append({"case": entry["case"], "spacing_mm": model_spacing, "perfect_model": name,
                             **{c: score[c] for c in SCORE_COLUMNS},
                             "gt_lesions": score["gt_lesions"], "detected_lesions": score["detected_lesions"]})
    return pd.DataFrame(rows)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    grouped = rows.groupby(["perfect_model", "spacing_mm"])
    summary = grouped[SCORE_COLUMNS].mean()
    summary["lesions_detected"] = grouped["detected_lesions"].sum()
    summary["lesions"] = grouped["gt_lesions"].sum()
    summary["cases_meeting_dsc_goal"] = grouped["Lesion_DSC"].apply(lambda v: int((v >= GOALS["lesion_dsc"]).sum()))
    return summary.reset_index()


def model_scores(quality_json: Path, cases: set[str]) -> dict | None:
    """The committed default-model scores on the same lesion cases, if they are the same cases."""
    if not quality_json.exists():
        return None
    result = json.loads(quality_json.read_text())
    per_case = pd.DataFrame(result["per_case"])
    per_case = per_case[per_case["case"].isin(cases)]
    if set(per_case["case"]) != cases:
        return None
    spacing = read_model_config(REPO / result["model"]).spacing
    return {"model": result["model"], "eval_seed": result["eval_seed"], "spacing_mm": float(max(spacing)),
            "Lesion_DSC": float(per_case["Lesion_DSC"].mean()), "Lesion_NSD": float(per_case["Lesion_NSD"].mean())}


def plot(summary: pd.DataFrame, model: dict | None, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    panels = (("Lesion_DSC", GOALS["lesion_dsc"]), ("Lesion_NSD", GOALS["lesion_nsd"]))
    for ax, (column, goal) in zip(axes, panels):
        for name, part in summary.groupby("perfect_model"):
            ax.plot(part["spacing_mm"], part[column], "o-", label=f"perfect model: {name}")
        ax.axhline(goal, color="red", linestyle="--", label=f"goal {goal:g}")
        if model and model["spacing_mm"]:
            ax.plot([model["spacing_mm"]], [model[column]], "k*", markersize=13, label=model["model"])
        ax.set_xlabel("model spacing (mm)")
        ax.set_ylabel(f"mean {column} (lesion cases)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict, summary: pd.DataFrame, rows: pd.DataFrame) -> str:
    lines = [
        "# Resolution ceiling: a perfect model at each spacing", "",
        f"{result['lesion_cases']} lesion phantoms of evaluation seed {result['seed']} (512x512xN, the cases of "
        f"results/default_model_quality.md), {result['machine']['date']}, {result['machine']['cpu']}. "
        f"Reproduce: `{result['command']}`.", "",
        "The network is replaced by the truth at the model's spacing; everything else is the engine's "
        "(crop, trilinear resampling of the logits back, argmax, paste). `target`: the training target "
        "(trilinear, > 0.5). `occupancy`: each model voxel's lesion fraction as its probability. Scored by "
        "run_metrics (FLARE rules, NSD 2 mm) against the full-resolution truth.", "",
        f"| perfect model | spacing (mm) | mean lesion DSC (goal {GOALS['lesion_dsc']:g}) | mean NSD 2 mm "
        f"(goal {GOALS['lesion_nsd']:g}) | lesion recall | lesions found | cases with DSC >= "
        f"{GOALS['lesion_dsc']:g} |", "|---|---|---|---|---|---|---|"]
    for row in summary.itertuples(index=False):
        lines.append(f"| {row.perfect_model} | {row.spacing_mm:g} | {row.Lesion_DSC:.3f} | {row.Lesion_NSD:.3f} | "
                     f"{row.lesion_recall:.3f} | {row.lesions_detected} / {row.lesions} | "
                     f"{row.cases_meeting_dsc_goal} / {result['lesion_cases']} |")
    model = result["model_on_same_cases"]
    if model:
        lines += ["", f"`{model['model']}` on the same cases (committed, through the CLI): mean lesion DSC "
                      f"{model['Lesion_DSC']:.3f}, NSD {model['Lesion_NSD']:.3f} at {model['spacing_mm']:g} mm."]
    wide = rows.pivot_table(index="case", columns=["perfect_model", "spacing_mm"], values="Lesion_DSC")
    lines += ["", "Per case, lesion DSC:", "",
              "| case | " + " | ".join(f"{m} {s:g} mm" for m, s in wide.columns) + " |",
              "|---|" + "---|" * len(wide.columns)]
    lines += [f"| {case} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
              for case, values in zip(wide.index, wide.values)]
    lines += ["", "![ceiling](resolution_ceiling.png)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7, help="phantom seed (eval_default_model's is 7)")
    parser.add_argument("--cases", type=int, default=20, help="phantoms with lesions")
    parser.add_argument("--healthy", type=int, default=10,
                        help="healthy phantoms in the set (not scored; kept so eval_default_model's set is reused)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="phantom shape (default: realistic 512x512xN, eval_default_model's)")
    parser.add_argument("--spacings", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0], help="model spacings, mm")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "eval_default_model"),
                        help="eval_default_model's work folder (phantoms reused from there)")
    parser.add_argument("--results", default=str(EXPERIMENT_RESULTS),
                        help="folder for resolution_ceiling.{json,md,png}")
    args = parser.parse_args(argv)
    if any(s <= 0 for s in args.spacings):
        parser.error("--spacings must be positive")
    data = Path(args.work) / f"quality_seed{args.seed}" / "data"
    entries = write_eval_set(data, args.seed, args.cases, args.healthy, args.shape)
    rows = score_perfect_models(data, entries, sorted(args.spacings))
    summary = summarize(rows)
    results = Path(args.results)
    cases = set(rows["case"])
    same_set = args.seed == 7 and args.shape is None
    model = model_scores(RESULTS / "default_model_quality.json", cases) if same_set else None
    command = ("python experiments/resolution_ceiling.py --seed {} --cases {}{} --spacings {}"
               .format(args.seed, args.cases, f" --shape {' '.join(map(str, args.shape))}" if args.shape else "",
                       " ".join(f"{s:g}" for s in sorted(args.spacings))))
    result = {"benchmark": "resolution ceiling", "seed": args.seed, "lesion_cases": len(cases),
              "command": command, "machine": machine_facts(), "goals": GOALS,
              "summary": json.loads(summary.to_json(orient="records")), "model_on_same_cases": model,
              "per_case": json.loads(rows.to_json(orient="records"))}
    write_text_atomically(results / "resolution_ceiling.json", json.dumps(result, indent=2))
    write_text_atomically(results / "resolution_ceiling.md", markdown(result, summary, rows))
    plot(summary, model, results / "resolution_ceiling.png",
         f"Perfect model at each spacing, {len(cases)} lesion phantoms (seed {args.seed})")
    print(summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
