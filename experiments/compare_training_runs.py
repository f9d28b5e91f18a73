"""Side by side: training runs of training/train_default.py and their validation scores, as a table and a plot.

    python experiments/compare_training_runs.py --run LABEL VALIDATION_JSON TRAINING_LOG_JSON [--run ...] \
        [--out experiments/results/training_runs]

VALIDATION_JSON is what `benchmarks/eval_default_model.py quality` wrote for the model (it holds the
training summary and the scores); TRAINING_LOG_JSON is the model folder's training_log.json (its loss
curve: the mean loss of the last 50 steps, every 50 steps). All runs should be scored on the same cases;
the script refuses runs whose evaluation seed or case counts differ. Each run after the first is also
compared with the first case by case (paired lesion-case DSC differences: their mean, its standard error,
and how many cases moved by more than 0.01 either way), because 16-20 cases whose DSCs spread from 0 to
0.9 make a difference of means alone hard to read. Writes OUT.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

import matplotlib.pyplot as plt
from benchmarks.eval_default_model import GOALS
from flare_common.files import write_text_atomically
from flare_common.results import EXPERIMENT_RESULTS, display

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parent.parent


SCORES = (  # (key in the validation metrics, column title)
    ("lesion_dsc_mean", "lesion DSC"), ("lesion_dsc_median", "median DSC"), ("lesion_nsd_mean", "NSD"),
    ("lesion_recall_mean", "recall"), ("lesion_precision_mean", "precision"),
    ("lymph_node_only_dsc_mean", "node-only DSC"), ("healthy_fp_volume_ml_mean", "healthy FP ml"),
    ("healthy_fp_rate", "healthy FP rate"),
)


def read_run(label: str, validation_path: Path, log_path: Path) -> dict:
    """One run's summary: its training (steps, minutes, loss curve) and its validation scores."""
    try:
        validation = json.loads(validation_path.read_text())
        log = json.loads(log_path.read_text())
        metrics, curve = validation["metrics"], log["loss_curve"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"compare_training_runs: {label}: cannot read its results ({error})") from None
    return dict(label=label, validation=display(validation_path), training_log=display(log_path),
                command=log.get("command"), steps=log.get("steps"),
                train_minutes=round(log.get("train_seconds", 0) / 60, 1), final_loss=log.get("final_loss"),
                eval_seed=validation.get("eval_seed"),
                cases=[metrics.get("lesion_cases"), metrics.get("healthy_cases")],
                scores={key: metrics.get(key) for key, _ in SCORES}, loss_curve=curve,
                lesion_case_dsc={row["case"]: row["Lesion_DSC"] for row in validation.get("per_case", [])
                                 if row.get("gt_lesions", 0) > 0})


def paired_dsc_change(run: dict, reference: dict) -> dict | None:
    """Lesion-case DSC of `run` minus `reference`'s on the same cases: mean, standard error, moves."""
    cases = sorted(set(run["lesion_case_dsc"]) & set(reference["lesion_case_dsc"]))
    if len(cases) < 2:
        return None
    change = np.array([run["lesion_case_dsc"][c] - reference["lesion_case_dsc"][c] for c in cases])
    return dict(cases=len(cases), mean=float(change.mean()),
                standard_error=float(change.std(ddof=1) / np.sqrt(len(cases))),
                better=int((change > 0.01).sum()), worse=int((change < -0.01).sum()))


def check_same_cases(runs: list[dict]) -> None:
    """Scores on different validation cases are not comparable: refuse them."""
    first = runs[0]
    for run in runs[1:]:
        if (run["eval_seed"], run["cases"]) != (first["eval_seed"], first["cases"]):
            raise SystemExit(f"compare_training_runs: {run['label']} was scored on seed {run['eval_seed']}, "
                             f"cases {run['cases']}; {first['label']} on seed {first['eval_seed']}, "
                             f"cases {first['cases']}")


def markdown(runs: list[dict]) -> str:
    first = runs[0]
    lines = ["# Training runs compared", "",
             f"Cases: seed {first['eval_seed']}, {first['cases'][0]} lesion + {first['cases'][1]} healthy "
             "phantoms, scored by `benchmarks/eval_default_model.py quality`. Loss: mean of the last 50 "
             "training steps.", "",
             "| run | steps | training min | final loss | " + " | ".join(t for _, t in SCORES) + " |",
             "|---" * (4 + len(SCORES)) + "|"]
    for run in runs:
        scores = " | ".join("" if run["scores"][k] is None else f"{run['scores'][k]:.3f}" for k, _ in SCORES)
        loss = "" if run["final_loss"] is None else f"{run['final_loss']:.3f}"
        lines.append(f"| {run['label']} | {run['steps']} | {run['train_minutes']} | {loss} | {scores} |")
    changes = [(run, run.get("paired_dsc_change")) for run in runs[1:]]
    if any(change for _, change in changes):
        lines += ["", f"Lesion-case DSC against {first['label']}, case by case:", "",
                  "| run | cases | mean change | standard error | better / worse (> 0.01) |", "|---|---|---|---|---|"]
        lines += [f"| {run['label']} | {c['cases']} | {c['mean']:+.3f} | {c['standard_error']:.3f} | "
                  f"{c['better']} / {c['worse']} |" for run, c in changes if c]
    lines += ["", "| run | command | validation | training log |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | `{r['command']}` | `{r['validation']}` | `{r['training_log']}` |" for r in runs]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    figure, (by_step, by_time, scores) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        steps, seconds, losses = zip(*run["loss_curve"])
        by_step.plot(steps, losses, label=run["label"])
        by_time.plot([s / 60 for s in seconds], losses, label=run["label"])
    for axis, xlabel in ((by_step, "training step"), (by_time, "training minutes")):
        axis.set(xlabel=xlabel, ylabel="loss (Dice + CE, 50-step mean)", ylim=(0, None))
        axis.grid(alpha=0.3)
    by_step.legend()
    keys = ("lesion_dsc_mean", "lesion_nsd_mean", "lesion_recall_mean", "lesion_precision_mean")
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        scores.bar([k + i * width for k in range(len(keys))], [run["scores"][k] or 0 for k in keys], width,
                   label=run["label"])
    scores.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], ["DSC", "NSD", "recall", "precision"])
    scores.axhline(GOALS["lesion_dsc"], color="k", lw=0.8, ls="--")
    scores.set(ylim=(0, 1), title=f"seed {runs[0]['eval_seed']} (dashed: DSC goal {GOALS['lesion_dsc']})")
    scores.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs=3, action="append", required=True,
                        metavar=("LABEL", "VALIDATION_JSON", "TRAINING_LOG_JSON"))
    parser.add_argument("--out", default=str(EXPERIMENT_RESULTS / "training_runs"),
                        help="output prefix: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    runs = [read_run(label, Path(v), Path(t)) for label, v, t in args.run]
    check_same_cases(runs)
    for run in runs[1:]:
        run["paired_dsc_change"] = paired_dsc_change(run, runs[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out.with_suffix(".json"), json.dumps({"runs": runs}, indent=1))
    write_text_atomically(out.with_suffix(".md"), markdown(runs))
    plot(runs, out.with_suffix(".png"))
    print(markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
