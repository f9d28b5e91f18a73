"""What the default model's speed settings cost: its calibrated defaults against nnU-Net's tiling in our own engine and
against nnU-Net's own `nnUNetPredictor`, on full-size phantoms of a seed nobody trains, validates or tunes on.

    .venv/bin/python benchmarks/bench_speed_departures.py [--seeds 31 ...] [--cases 8] [--peer-python PYTHON]

Three settings, each one run on the CPU over the same cases (the phantom generator's own mix of lesion and healthy
cases, 512 x 512 x N at a protocol's spacing):
- `ours (defaults)`: `python -m inference` with no setting flags: the model folder's calibration record
  (inference.json: patch scale, step, crop, backend) and its lesion filter;
- `ours (nnU-Net's tiling)`: `--crop none --patch-scale 1.0 --step-size 0.5 --backend torch`: the training patch, half
  overlap, every window, torch; the same lesion filter;
- `nnUNetPredictor (its defaults, TTA off)`: nnU-Net 2.8.1 (benchmarks/_nnunet_side.py, `--resampler plans`): its
  resampling as plans.json says, step 0.5, no mirroring; no lesion filter (nnU-Net has none).
Per case: the FLARE lesion DSC and NSD (evaluation.run_metrics.score_case: both empty 1, one empty 0), agreement
(DSC) with our engine at nnU-Net's tiling, and seconds (each engine's own, read to write, model load excluded).
Goals (issue 34): the defaults' mean lesion DSC >= each of the other two - 0.005, and >= 0.65; with several --seeds,
over all their cases (and each seed's reported beside).
Writes results/speed_departures_<device>_<date>.{json,md} (seed 31 alone), else
results/speed_departures_seeds<S1-S2..>_<device>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from evaluation.run_metrics import score_case
from flare_common.machine import machine_facts
from flare_common.results import REPO, display, write_result
from inference.model import CALIBRATION_FILE, read_records
from phantoms import generate_phantom, write_case

MODEL = REPO / "models" / "default"
TOLERANCE = 0.005
GOAL_DSC = 0.65
DEFAULTS, TILING, PEER = "ours (defaults)", "ours (nnU-Net's tiling)", "nnUNetPredictor (its defaults, TTA off)"
OURS = {DEFAULTS: [], TILING: ["--crop", "none", "--patch-scale", "1.0", "--step-size", "0.5", "--backend", "torch"]}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int(np.logical_and(a, b).sum()) / total


def run_ours(images: Path, out: Path, flags: list[str], timings: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "inference", "-i", str(images), "-o", str(out), "-m", str(MODEL), "--device",
               "cpu", "--sequential", "--quiet", "--timings", str(timings), *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_speed_departures: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    cases = json.loads(timings.read_text())["cases"]
    return {name[: -len("_0000.nii.gz")]: entry["total"] for name, entry in cases.items()}


def run_peer(python: str, images: Path, out: Path, timings: Path) -> dict[str, float]:
    command = [python, "benchmarks/_nnunet_side.py", "-i", str(images), "-o", str(out), "-m", str(MODEL),
               "--resampler", "plans", "--threads", "2", "--device", "cpu", "--timings", str(timings)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_speed_departures: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return {name: entry["total"] for name, entry in json.loads(timings.read_text())["cases"].items()}


def measure_seed(seed: int, cases: int, peer_python: str) -> list[dict]:
    """Every setting on `cases` phantoms of `seed`: one row per case and setting."""
    with tempfile.TemporaryDirectory(prefix="speed-departures-") as scratch:
        scratch = Path(scratch)
        data = scratch / "data"
        names = [write_case(generate_phantom(seed, index), data)["case"] for index in range(cases)]
        seconds, outputs = {}, {}
        for label, flags in OURS.items():
            outputs[label] = scratch / label.replace(" ", "_")
            seconds[label] = run_ours(data / "images", outputs[label], flags, scratch / f"{len(flags)}.json")
        outputs[PEER] = scratch / "peer"
        seconds[PEER] = run_peer(peer_python, data / "images", outputs[PEER], scratch / "peer.json")
        rows = []
        for name in names:
            truth_image = sitk.ReadImage(str(data / "labels" / f"{name}.nii.gz"))
            truth = sitk.GetArrayFromImage(truth_image) > 0
            masks = {label: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{name}.nii.gz"))) > 0
                     for label, folder in outputs.items()}
            for label, mask in masks.items():
                score = score_case(truth, mask, truth_image.GetSpacing()[::-1], lesion_wise=False)
                rows.append({"seed": seed, "case": name, "shape_zyx": "x".join(map(str, truth.shape)),
                             "lesions": bool(truth.any()), "setting": label,
                             "lesion_dsc": round(score["Lesion_DSC"], 4), "lesion_nsd": round(score["Lesion_NSD"], 4),
                             "agreement_with_nnunet_tiling": round(agreement(mask, masks[TILING]), 4),
                             "seconds": round(seconds[label][name], 2)})
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per setting: mean lesion DSC, NSD and seconds over `rows`."""
    def mean(label: str, key: str, digits: int = 4) -> float:
        return round(float(np.mean([r[key] for r in rows if r["setting"] == label])), digits)

    return {label: {"mean_lesion_dsc": mean(label, "lesion_dsc"), "mean_lesion_nsd": mean(label, "lesion_nsd"),
                    "seconds_per_case": mean(label, "seconds", 2)} for label in [*OURS, PEER]}


def goals_of(summary: dict) -> dict:
    ours, dsc = summary[DEFAULTS]["mean_lesion_dsc"], {label: s["mean_lesion_dsc"] for label, s in summary.items()}
    return {f"defaults >= nnU-Net's tiling - {TOLERANCE}": ours >= dsc[TILING] - TOLERANCE,
            f"defaults >= nnUNetPredictor - {TOLERANCE}": ours >= dsc[PEER] - TOLERANCE,
            f"defaults >= {GOAL_DSC}": ours >= GOAL_DSC}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[31],
                        help="phantom seeds nobody trains, validates or tunes on (each reported, and all pooled)")
    parser.add_argument("--cases", type=int, default=8, help="phantoms per seed")
    parser.add_argument("--peer-python", default=str(REPO / ".venv-nnunet" / "bin" / "python"))
    args = parser.parse_args(argv)
    calibration = read_records(MODEL / CALIBRATION_FILE).get("cpu", {}).get("chosen")
    if calibration is None:
        sys.exit(f"bench_speed_departures: {display(MODEL / CALIBRATION_FILE)} holds no cpu record")
    rows = [row for seed in args.seeds for row in measure_seed(seed, args.cases, args.peer_python)]
    by_seed = {seed: summarise([r for r in rows if r["seed"] == seed]) for seed in args.seeds}
    summary = summarise(rows)
    goals = goals_of(summary)
    machine = machine_facts()
    seeds = " ".join(map(str, args.seeds))
    command = f".venv/bin/python {display(__file__)} --seeds {seeds} --cases {args.cases}"
    result = {"machine": machine, "command": command, "model": display(MODEL), "calibration": calibration,
              "rows": rows, "summary": summary, "by_seed": {str(k): v for k, v in by_seed.items()}, "goals": goals,
              "goals_by_seed": {str(seed): goals_of(s) for seed, s in by_seed.items()}}
    lines = ["# What the default model's speed settings cost, against nnU-Net's tiling and nnUNetPredictor", "",
             f"Machine: {machine['cpu']}, {machine['date'][:10]}, CPU (2 threads each). Command: `{command}`", "",
             f"{args.cases} full-size phantoms of each seed {seeds} (no model was trained, validated or tuned on any), "
             f"`models/default` with its calibration record: patch x{calibration['patch_scale']:g}, step "
             f"{calibration['step_size']:g}, {calibration.get('crop', 'exact')} crop, backend "
             f"{calibration['backend']}. "
             "Lesion DSC and NSD as FLARE scores them (a healthy case: 1 where nothing is predicted, else 0). "
             "Seconds: each engine's own per case, read to write, model load excluded.", "",
             "| seeds | setting | mean lesion DSC | mean lesion NSD | seconds per case |", "|---|---|---|---|---|"]
    for label_seeds, table in [*((str(seed), s) for seed, s in by_seed.items()),
                               *([(f"all {len(args.seeds)} ({len(rows) // 3} cases)", summary)]
                                 if len(args.seeds) > 1 else [])]:
        lines += [f"| {label_seeds} | {label} | {s['mean_lesion_dsc']} | {s['mean_lesion_nsd']} | "
                  f"{s['seconds_per_case']} |" for label, s in table.items()]
    lines += ["", "Goals" + (" (all seeds pooled)" if len(args.seeds) > 1 else "") + ": "
              + "; ".join(f"{goal}: {'met' if met else 'NOT met'}" for goal, met in goals.items()) + "."]
    if len(args.seeds) > 1:
        lines += ["", "By seed: " + "; ".join(
            f"{seed}: " + ", ".join(f"{goal.split(' >= ')[1]} {'met' if met else 'NOT met'}"
                                    for goal, met in goals_of(s).items()) for seed, s in by_seed.items()) + "."]
    lines += ["", "| seed | case | shape (z y x) | lesions | setting | lesion DSC | lesion NSD | agreement with nnU-Net's "
              "tiling | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['case']} | {r['shape_zyx']} | {'yes' if r['lesions'] else 'no'} | {r['setting']} | "
              f"{r['lesion_dsc']} | {r['lesion_nsd']} | {r['agreement_with_nnunet_tiling']} | {r['seconds']} |"
              for r in rows]
    name = "speed_departures" if args.seeds == [31] else f"speed_departures_seeds{'-'.join(map(str, args.seeds))}"
    stem = write_result(name, result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {display(stem)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
