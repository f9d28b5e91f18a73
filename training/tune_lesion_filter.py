"""Tune a model's lesion filter (inference/lesion_filter.py) on validation phantoms, never the evaluation set.

    python training/tune_lesion_filter.py [--model models/default] [--seed 8 [9 ...]] [--cases 16]
                                            [--healthy 8] [--write]

1. generates `--cases` phantoms with lesions and `--healthy` healthy ones of each VALIDATION seed (not the
   evaluation seed 7 of eval_default_model.py, not the training seed 1000; refused if it is either);
   several seeds are pooled into one set of cases, so that a threshold is not chosen on 16 cases' luck;
2. runs every case through the engine's own stages up to the model-resolution logits (crop, resample +
   normalise, sliding window), finds the predicted lesions with `lesion_components` and records each one's
   volume, peak probability and overlap with the ground truth brought to model resolution (trilinear,
   > 0.5, as training does);
3. scores every (min_volume_ml, min_peak_probability) pair of a grid without predicting again, since the
   filter only removes whole components: per case the FLARE DSC (a healthy case scores 1 if nothing is
   left, else 0), its mean over the lesion cases and over all cases, the healthy false-positive rate and
   the share of true lesions still touched by a prediction (recall);
   picks the pair with the best `--objective` among those that lose at most `--max-recall-loss` of
   recall (ties: the milder filter). The default objective is the lesion cases' mean DSC: the all-case
   mean rewards emptying healthy cases so much that, for a weak model, its best filter also drops
   almost every true lesion;
4. writes results/lesion_filter_tuning.{json,md,png} and, with --write, MODEL/lesion_filter.json.
The per-case statistics are kept in --work after every case; --reuse goes on from them (same weights
only), so scoring again or finishing an interrupted run does not predict again.

Scores are at model resolution (3 mm for the default model): a guide for choosing thresholds. The real
figures come from `python benchmarks/eval_default_model.py quality`, through the CLI, on the evaluation
seed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import cc3d
import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

from phantoms import write_eval_set
from phantoms.case import DEFAULT_HEALTHY_FRACTION
from flare_common.files import write_text_atomically
from flare_common.results import RESULTS, display
from flare_common.machine import machine_facts
from inference.lesion_filter import FILTER_FILE, LesionFilter, lesion_components, read_lesion_filter
from inference import PredictionSettings
from inference.model import load_model
from inference.network_plan import network_logits
from inference.pipeline import crop_box, to_model_space
from inference.postprocess import lesion_label_ids
from training.train_default import training_target

REPO = Path(__file__).resolve().parent.parent


EVALUATION_SEED, TRAINING_SEED = 7, 1000
VOLUME_GRID_ML = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)
# peak probabilities of a trained network saturate: true and false lesions differ in the last nines
PROBABILITY_GRID = (0.0, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999)


def case_components(image: sitk.Image, label: sitk.Image, model, settings: PredictionSettings) -> dict:
    """The case's predicted lesions at model resolution, each with the ground-truth voxels it covers,
    and the ground-truth lesions with the predicted components that touch them."""
    config = model.config
    array = sitk.GetArrayViewFromImage(image)
    spacing = tuple(image.GetSpacing())[::-1]
    box = crop_box(array, spacing, settings)
    with torch.inference_mode():
        volume = to_model_space(array[box].copy(), spacing, model)
        logits = network_logits(volume, model, settings).logits
        lesion_ids = lesion_label_ids(config.labels, settings.lesion_labels)
        found = lesion_components(logits, lesion_ids, config.voxel_ml)
        truth = torch.from_numpy(sitk.GetArrayViewFromImage(label)[box] > 0).permute(*config.transpose_forward)
        truth = training_target(truth, tuple(logits.shape[1:])).numpy()
    n = len(found.volume_ml)
    covered = np.bincount(found.labels[truth], minlength=n + 1)[1:]
    truth_lesions = cc3d.connected_components(truth, connectivity=26)
    touching = [sorted(set(found.labels[truth_lesions == i].tolist()) - {0})
                for i in range(1, int(truth_lesions.max()) + 1)]
    return {"truth_voxels": int(truth.sum()), "voxel_ml": config.voxel_ml,
            "components": [{"volume_ml": float(v), "peak_probability": float(p), "truth_voxels": int(c)}
                           for v, p, c in zip(found.volume_ml, found.peak_probability, covered)],
            "truth_lesions_touched_by": touching}


def weights_fingerprint(model_dir: Path, folds) -> str:
    """SHA-256 over the checkpoints the model loads: statistics are reused only for the same weights."""
    digest = hashlib.sha256()
    for fold in folds:
        digest.update((model_dir / f"fold_{fold}" / "checkpoint_final.pth").read_bytes())
    return digest.hexdigest()


def is_healthy(case: dict) -> bool:
    """A healthy phantom (from the manifest); without that, no ground truth left at model resolution."""
    return case.get("healthy", case["truth_voxels"] == 0)


def score_filter(cases: list[dict], lesion_filter: LesionFilter) -> dict:
    """Model-resolution scores of the cases (case_components output) after `lesion_filter`."""
    dsc, healthy_left, found, truth_lesions = [], [], 0, 0
    for case in cases:
        comps = case["components"]
        kept = [i for i, c in enumerate(comps) if lesion_filter.keeps(c["volume_ml"], c["peak_probability"])]
        predicted = sum(comps[i]["volume_ml"] for i in kept) / case["voxel_ml"]
        overlap = sum(comps[i]["truth_voxels"] for i in kept)
        if is_healthy(case):
            healthy_left.append(bool(kept))
        if case["truth_voxels"] == 0:  # FLARE: both empty scores 1
            dsc.append(0.0 if kept else 1.0)
            continue
        dsc.append(2 * overlap / (predicted + case["truth_voxels"]))
        kept_ids = {i + 1 for i in kept}
        touched = case["truth_lesions_touched_by"]
        found += sum(bool(kept_ids & set(ids)) for ids in touched)
        truth_lesions += len(touched)
    lesion_dsc = float(np.mean([d for d, c in zip(dsc, cases) if not is_healthy(c)] or [np.nan]))
    healthy_fp_rate = float(np.mean(healthy_left)) if healthy_left else float("nan")
    return {"min_volume_ml": lesion_filter.min_volume_ml,
            "min_peak_probability": lesion_filter.min_peak_probability,
            "all_cases_dsc": float(np.mean(dsc)) if dsc else float("nan"),
            "lesion_dsc": lesion_dsc,
            # the FLARE mean of a set with the generator's own healthy share (bench_speed_departures' seeds), where
            # a validation set's is --healthy / (--cases + --healthy)
            "generator_mix_dsc": (1 - DEFAULT_HEALTHY_FRACTION) * lesion_dsc
            + DEFAULT_HEALTHY_FRACTION * (1 - healthy_fp_rate),
            "healthy_fp_rate": healthy_fp_rate,
            "lesion_recall": found / truth_lesions if truth_lesions else float("nan")}


def score_grid(cases: list[dict], volumes=VOLUME_GRID_ML, probabilities=PROBABILITY_GRID) -> pd.DataFrame:
    return pd.DataFrame([score_filter(cases, LesionFilter(v, p)) for v in volumes for p in probabilities])


def unfiltered_row(grid: pd.DataFrame) -> pd.Series:
    """The grid's scores without a filter (both thresholds 0)."""
    return grid[(grid["min_volume_ml"] == 0) & (grid["min_peak_probability"] == 0)].iloc[0]


def best_filter(grid: pd.DataFrame, objective: str = "lesion_dsc", max_recall_loss: float = 1.0) -> pd.Series:
    """The pair with the highest `objective` among those whose lesion recall is at most
    `max_recall_loss` below the unfiltered one; among equals the mildest (smallest thresholds)."""
    recall = unfiltered_row(grid)["lesion_recall"]
    allowed = grid if np.isnan(recall) else grid[grid["lesion_recall"] >= recall - max_recall_loss - 1e-9]
    ranked = allowed.sort_values([objective, "min_volume_ml", "min_peak_probability"],
                                 ascending=[False, True, True], kind="stable")
    return ranked.iloc[0]


def plot_grid(grid: pd.DataFrame, best: pd.Series, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8), constrained_layout=True)
    panels = {"all_cases_dsc": "mean DSC, all cases (FLARE)", "lesion_dsc": "mean DSC, lesion cases",
              "healthy_fp_rate": "healthy FP rate", "lesion_recall": "lesion recall"}
    for ax, (column, label) in zip(axes, panels.items()):
        table = grid.pivot(index="min_volume_ml", columns="min_peak_probability", values=column)
        image = ax.imshow(table.values, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(table.columns)), [f"{p:g}" for p in table.columns], rotation=45)
        ax.set_yticks(range(len(table.index)), [f"{v:g}" for v in table.index])
        ax.set_xlabel("min peak lesion probability")
        ax.set_ylabel("min volume (ml)")
        ax.set_title(label)
        ax.plot(list(table.columns).index(best["min_peak_probability"]),
                list(table.index).index(best["min_volume_ml"]), "r*", markersize=14)
        fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seeds_text(seeds) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds)) + " pooled"


def markdown(result: dict, grid: pd.DataFrame) -> str:
    best, none, shipped = result["best"], result["unfiltered"], result["shipped"]
    rows = grid.sort_values(result["objective"], ascending=False).head(10)
    lines = [
        "# Lesion filter tuning (validation phantoms, model resolution)", "",
        f"Model `{result['model']}`, validation {seeds_text(result['seeds'])} ({result['lesion_cases']} "
        f"lesion + {result['healthy_cases']} healthy phantoms, 512x512xN), {result['machine']['date']}, "
        f"{result['machine']['cpu']}. Reproduce: `{result['command']}`.", "",
        "Scores are at model resolution and only guide the choice; the evaluation-seed figures through the "
        "CLI are in results/default_model_quality.md.", "",
        f"Chosen: the best `{result['objective']}` among the filters that lose at most "
        f"{result['max_recall_loss']:g} of lesion recall.", "",
        f"| filter | min volume (ml) | min peak probability | mean DSC all cases | mean DSC lesion cases | "
        f"mean DSC at the generator's {DEFAULT_HEALTHY_FRACTION:.0%} healthy share | healthy FP rate | lesion recall |",
        "|---|---|---|---|---|---|---|---|"]
    for name, row in (("none", none), ("chosen", best),
                      *([(f"the model folder's {FILTER_FILE}", shipped)] if shipped else [])):
        lines.append(f"| {name} | {row['min_volume_ml']:g} | {row['min_peak_probability']:g} | "
                     f"{row['all_cases_dsc']:.3f} | {row['lesion_dsc']:.3f} | {row['generator_mix_dsc']:.3f} | "
                     f"{row['healthy_fp_rate']:.2f} | {row['lesion_recall']:.2f} |")
    if len(result["per_seed"]) > 1:
        lines += ["", "The chosen filter on each seed alone:", "",
                  "| seed | filter | mean DSC all cases | mean DSC lesion cases | healthy FP rate | lesion recall |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {seed} | {name} | {row['all_cases_dsc']:.3f} | {row['lesion_dsc']:.3f} | "
                  f"{row['healthy_fp_rate']:.2f} | {row['lesion_recall']:.2f} |"
                  for seed, rows_of_seed in result["per_seed"].items() for name, row in rows_of_seed.items()]
    lines += ["", f"Best 10 of the grid by {result['objective']}, whatever their recall:", "",
              "| " + " | ".join(rows.columns) + " |", "|" + "---|" * len(rows.columns)]
    lines += ["| " + " | ".join(f"{v:g}" if name.startswith("min_") else f"{v:.3f}"
                                for name, v in zip(rows.columns, row)) + " |"
              for row in rows.itertuples(index=False)]
    lines += ["", "![grid](lesion_filter_tuning.png)"]
    return "\n".join(lines) + "\n"


def seed_cases(data: Path, stats_path: Path, seed: int, args, model, fingerprint: str) -> list[dict]:
    """The component statistics of one validation seed's cases, predicted (or reused with --reuse from
    an earlier run of the same weights) and kept after every case."""
    entries = write_eval_set(data, seed, args.cases, args.healthy, None)
    settings = PredictionSettings()  # measure the model as it predicts, without its own filter
    earlier = json.loads(stats_path.read_text()) if args.reuse and stats_path.exists() else {}
    same_weights = isinstance(earlier, dict) and earlier.get("weights") == fingerprint
    done = {c["case"]: c for c in earlier["cases"]} if same_weights else {}
    cases = []
    for entry in tqdm(entries, desc=f"validation cases, seed {seed}", unit="case"):
        if entry["case"] not in done:
            image = sitk.ReadImage(str(data / "images" / f"{entry['case']}_0000.nii.gz"))
            label = sitk.ReadImage(str(data / "labels" / f"{entry['case']}.nii.gz"))
            done[entry["case"]] = {"case": entry["case"], "healthy": not entry.get("lesions"),
                                   **case_components(image, label, model, settings)}
            # after every case, so that an interrupted run goes on with --reuse
            write_text_atomically(stats_path, json.dumps({"weights": fingerprint, "cases": list(done.values())}))
        cases.append({**done[entry["case"]], "seed": seed})
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "default"))
    parser.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[8],
                        help="validation seeds, pooled (not 7, not 1000)")
    parser.add_argument("--cases", type=int, default=16, help="phantoms with lesions, per seed")
    parser.add_argument("--healthy", type=int, default=8, help="healthy phantoms, per seed")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--objective", default="lesion_dsc", choices=["lesion_dsc", "all_cases_dsc"],
                        help="mean DSC of the lesion cases, or of all cases (FLARE: empty healthy case = 1)")
    parser.add_argument("--max-recall-loss", type=float, default=0.05,
                        help="largest drop of lesion recall (share of true lesions found) the filter may cost")
    parser.add_argument("--write", action="store_true", help=f"write MODEL/{FILTER_FILE}")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the per-case component statistics of an earlier (or interrupted) run "
                             "of the same model weights; predict only the cases missing")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tune_lesion_filter"))
    parser.add_argument("--results", default=str(RESULTS), help="folder for lesion_filter_tuning.*")
    args = parser.parse_args(argv)
    for seed in args.seeds:
        if seed in (EVALUATION_SEED, TRAINING_SEED):
            parser.error(f"--seed {seed} is the {'evaluation' if seed == EVALUATION_SEED else 'training'} "
                         "seed; tune on another one")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seed names a seed twice")
    model = load_model(args.model, device=args.device)
    fingerprint = weights_fingerprint(Path(args.model), model.folds)
    cases = []
    for seed in args.seeds:
        stats_path = Path(args.work) / f"components_seed{seed}_{Path(args.model).resolve().name}.json"
        cases += seed_cases(Path(args.work) / f"seed{seed}", stats_path, seed, args, model, fingerprint)
    grid = score_grid(cases)
    best = best_filter(grid, args.objective, args.max_recall_loss)
    unfiltered = unfiltered_row(grid)
    command = ("python training/tune_lesion_filter.py --model " + display(args.model)
               + f" --seed {' '.join(map(str, args.seeds))} --cases {args.cases} --healthy {args.healthy}"
               + f" --objective {args.objective} --max-recall-loss {args.max_recall_loss:g}")
    chosen_filter = LesionFilter(float(best["min_volume_ml"]), float(best["min_peak_probability"]))
    in_folder = read_lesion_filter(args.model)  # what the folder ships now, scored on the same cases
    shipped = score_filter(cases, in_folder) if in_folder != LesionFilter() else None
    # how the pooled choice does on each seed alone: a threshold that only one seed likes shows here
    per_seed = {str(seed): {"unfiltered": score_filter(of_seed, LesionFilter()),
                            "chosen": score_filter(of_seed, chosen_filter)}
                for seed in args.seeds for of_seed in [[c for c in cases if c["seed"] == seed]]}
    result = {"benchmark": "lesion filter tuning", "model": display(args.model), "seeds": args.seeds,
              "lesion_cases": sum(not is_healthy(c) for c in cases), "healthy_cases": sum(map(is_healthy, cases)),
              "command": command, "per_seed": per_seed, "shipped": shipped,
              "objective": args.objective, "max_recall_loss": args.max_recall_loss,
              "machine": machine_facts(), "best": best.to_dict(), "unfiltered": unfiltered.to_dict(),
              "grid": grid.to_dict(orient="records")}
    results = Path(args.results)
    write_text_atomically(results / "lesion_filter_tuning.json", json.dumps(result, indent=2))
    write_text_atomically(results / "lesion_filter_tuning.md", markdown(result, grid))
    plot_grid(grid, best, results / "lesion_filter_tuning.png",
              f"{display(args.model)}: validation {seeds_text(args.seeds)}, model resolution (red star: chosen)")
    print(markdown(result, grid))
    if args.write:
        chosen = {"min_volume_ml": float(best["min_volume_ml"]),
                  "min_peak_probability": float(best["min_peak_probability"]),
                  "tuned_by": command,
                  "validation": {k: round(float(best[k]), 4)
                                 for k in ("lesion_dsc", "all_cases_dsc", "healthy_fp_rate", "lesion_recall")},
                  "date": result["machine"]["date"]}
        write_text_atomically(Path(args.model) / FILTER_FILE, json.dumps(chosen, indent=2) + "\n")
        print(f"wrote {Path(args.model) / FILTER_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
