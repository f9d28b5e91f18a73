"""Parity benchmark against the peer: nnU-Net v2's own `nnUNetPredictor`, same model, same cases, same run.

    bash scripts/setup_nnunet_env.sh                       # once: .venv-nnunet with nnunetv2 2.8.1 (CPU)
    .venv/bin/python benchmarks/parity_nnunet.py           # -> results/parity_nnunet.{json,md}

What runs, on the CPU, one after the other, with the same number of torch threads:
  * the model: training/make_blob_model.py trains it if the model folder does not exist yet;
  * N synthetic CT cases (int16, anisotropic spacings, flipped directions, offset origins);
  * nnU-Net 2.8.1 (`.venv-nnunet`, benchmarks/_nnunet_side.py): step 0.5, Gaussian weighting, no
    mirroring, everything on the CPU; once with the model's plans as written (scikit-image resampling,
    as nnU-Net's default planner writes them) and once with nnU-Net's torch resampler (the kwargs of its
    `*_torchres` planners: trilinear, no separate z), the resampling our engine uses;
  * our engine, `python -m inference`: once apples-to-apples (training patch, step 0.5, no body crop) and
    once with its defaults (larger inference patch, body crop).
Per case: Dice agreement between the masks, Dice of each against the synthetic ground truth, seconds
per case (model load excluded, reading and writing included) and the ratio nnU-Net / ours.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from training.make_blob_model import DEFAULT_FOLDER, PATCH_SIZE, dice, synthesize_case
from flare_common.machine import machine_facts
from flare_common.files import write_text_atomically

REPO = Path(__file__).resolve().parent.parent


# (z, y, x) spacing in mm, (z, y, x) size, direction flips (x, y, z) as SimpleITK orders axes.
CASE_GEOMETRIES = [
    {"spacing": (2.5, 0.8, 0.8), "shape": (72, 176, 176), "flip": (False, False, False)},
    {"spacing": (2.0, 0.75, 0.75), "shape": (88, 200, 184), "flip": (True, True, False)},
    {"spacing": (1.5, 1.0, 1.0), "shape": (112, 144, 152), "flip": (False, False, True)},
    {"spacing": (3.0, 0.7, 0.7), "shape": (60, 192, 208), "flip": (True, False, True)},
]


def make_cases(folder: Path, n_cases: int, seed: int) -> dict:
    """Write <case>_0000.nii.gz images (and ground truth to folder/../truth); return their geometry."""
    rng = np.random.default_rng(seed + 1000)
    truth_dir = folder.parent / "truth"
    folder.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    cases = {}
    for index in range(n_cases):
        geometry = CASE_GEOMETRIES[index % len(CASE_GEOMETRIES)]
        name = f"blob_{index:03d}"
        volume, label = synthesize_case(geometry["shape"], geometry["spacing"], rng)
        direction = np.diag([-1.0 if f else 1.0 for f in geometry["flip"]]).flatten().tolist()
        origin = [float(v) for v in rng.uniform(-250, 250, size=3)]
        for array, path in ((volume, folder / f"{name}_0000.nii.gz"), (label, truth_dir / f"{name}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(tuple(float(s) for s in geometry["spacing"][::-1]))
            image.SetDirection(direction)
            image.SetOrigin(origin)
            sitk.WriteImage(image, str(path), useCompression=True)
        cases[name] = {"shape_zyx": list(geometry["shape"]), "spacing_zyx": list(geometry["spacing"]),
                       "direction": direction, "origin_xyz": origin,
                       "lesion_voxels": int(label.sum())}
    return cases


def run_timed(command: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """Run a command, its output into log_path; return (wall, CPU) seconds; fail with the log's tail."""
    cpu_before = _children_cpu_seconds()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"parity_nnunet: '{' '.join(command)}' failed (exit {completed.returncode}):\n{tail}")
    return seconds, _children_cpu_seconds() - cpu_before


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_mask(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image) > 0, image


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def case_key(name: str) -> str:
    for suffix in ("_0000.nii.gz", ".nii.gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def our_case_seconds(timings_path: Path) -> dict:
    report = json.loads(timings_path.read_text())
    return {case_key(name): t for name, t in report["cases"].items()}


_VERSION_CODE = """
import json
from importlib.metadata import PackageNotFoundError, version
found = {}
for package in ("torch", "nnunetv2", "dynamic-network-architectures", "SimpleITK", "scikit-image", "numpy"):
    try:
        found[package] = version(package)
    except PackageNotFoundError:
        pass
print(json.dumps(found))
"""


def versions(python: str) -> dict:
    """Package versions in the environment of `python`."""
    try:
        out = subprocess.run([python, "-c", _VERSION_CODE], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, json.JSONDecodeError, IndexError):
        return {}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(REPO / "work" / "parity"), help="scratch folder")
    parser.add_argument("--model", default=None, help=f"model folder (default: WORK/{DEFAULT_FOLDER}, "
                        "trained by make_blob_model.py if missing)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both engines (1: least disturbed on a shared machine)")
    parser.add_argument("--nnunet-python", default=str(REPO / ".venv-nnunet" / "bin" / "python"))
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per engine, taking turns; each case keeps its fastest time")
    parser.add_argument("--skip-torchres", action="store_true",
                        help="skip the nnU-Net run with its torch resampler")
    parser.add_argument("--results", default=str(REPO / "results"))
    args = parser.parse_args(argv)

    if not Path(args.nnunet_python).exists():
        raise SystemExit(f"parity_nnunet: {args.nnunet_python} not found; run scripts/setup_nnunet_env.sh")
    work = Path(args.work)
    model = Path(args.model) if args.model else work / DEFAULT_FOLDER
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO)}
    work.mkdir(parents=True, exist_ok=True)
    if not (model / "fold_all" / "checkpoint_final.pth").exists():
        print(f"training the blob model into {model} ...", flush=True)
        run_timed([sys.executable, "training/make_blob_model.py", "--out", str(model),
                   "--steps", str(args.train_steps), "--seed", str(args.seed),
                   "--threads", str(args.threads)], env, work / "train.log")

    images = work / "images"
    for old in list(images.glob("*.nii.gz")) if images.exists() else []:
        old.unlink()
    cases = make_cases(images, args.cases, args.seed)
    print(f"{len(cases)} cases in {images}", flush=True)

    runs = {  # name -> (command, timings file, output folder)
        "nnunet": [args.nnunet_python, "benchmarks/_nnunet_side.py", "--resampler", "plans"],
        "nnunet_torchres": [args.nnunet_python, "benchmarks/_nnunet_side.py", "--resampler", "torch"],
        "ours_same_settings": [sys.executable, "benchmarks/_ours_side.py", "--device", "cpu",
                               "--step-size", "0.5", "--patch-size", *map(str, PATCH_SIZE), "--no-crop",
                               "--quiet"],
        "ours_defaults": [sys.executable, "benchmarks/_ours_side.py", "--device", "cpu", "--quiet"],
    }
    # Where do nnU-Net's default masks differ from its torch-resampler ones: input or export resampling?
    # These two only explain differences, so they run once, in the last round.
    diagnostic_runs = {
        "nnunet_torch_input_only": [args.nnunet_python, "benchmarks/_nnunet_side.py",
                                    "--resampler", "torch-input"],
        "nnunet_torch_export_only": [args.nnunet_python, "benchmarks/_nnunet_side.py",
                                     "--resampler", "torch-export"],
    }
    if args.skip_torchres:
        del runs["nnunet_torchres"]
        diagnostic_runs.clear()
    # Every engine runs `repeats` times, the engines taking turns, and each case keeps its fastest time:
    # other work on a shared machine only ever adds time, so the minimum is the least disturbed measure.
    results: dict = {}
    for round_index in range(args.repeats):
        last_round = round_index == args.repeats - 1
        for name, command in {**runs, **(diagnostic_runs if last_round else {})}.items():
            out, timings = work / "out" / name, work / f"timings_{name}.json"
            out.mkdir(parents=True, exist_ok=True)
            for old in out.glob("*.nii.gz"):
                old.unlink()
            extra = ["--threads", str(args.threads)] if name.startswith("nnunet") else []
            print(f"round {round_index + 1}/{args.repeats}: {name} ...", flush=True)
            wall, cpu = run_timed(command + ["-i", str(images), "-o", str(out), "-m", str(model),
                                             "--timings", str(timings)] + extra,
                                  env, work / f"{name}.log")
            report = json.loads(timings.read_text())
            per_case = (dict(report["cases"]) if name.startswith("nnunet") else our_case_seconds(timings))
            run = results.setdefault(name, {"rounds": [], "output": out})
            run["rounds"].append({"wall_seconds_incl_start_and_load": wall, "cpu_seconds": cpu,
                                  "model_load_seconds": report.get("model_load_seconds",
                                                                   report.get("model_load_s")),
                                  "per_case": per_case})
    for run in results.values():
        run["per_case"] = {case: {key: min(r["per_case"][case][key] for r in run["rounds"])
                                  for key in ("total", "cpu")}
                           for case in run["rounds"][0]["per_case"]}

    truth_dir = images.parent / "truth"
    table = []
    for case in cases:
        truth, _ = read_mask(truth_dir / f"{case}.nii.gz")
        source = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        masks, row = {}, {"case": case, **cases[case]}
        for name, run in results.items():
            mask, image = read_mask(run["output"] / f"{case}.nii.gz")
            masks[name] = mask
            row[f"{name}_seconds"] = float(run["per_case"][case]["total"])
            row[f"{name}_cpu_seconds"] = float(run["per_case"][case]["cpu"])
            row[f"{name}_dsc_vs_truth"] = dice(mask, truth)
            row[f"{name}_geometry_matches_input"] = same_geometry(image, source)
            row[f"{name}_voxels"] = int(mask.sum())
        for ours in ("ours_same_settings", "ours_defaults"):
            for peer in (n for n in runs if n.startswith("nnunet")):
                row[f"dsc_{ours}_vs_{peer}"] = dice(masks[ours], masks[peer])
                row[f"speedup_{ours}_vs_{peer}"] = row[f"{peer}_seconds"] / row[f"{ours}_seconds"]
                row[f"cpu_speedup_{ours}_vs_{peer}"] = row[f"{peer}_cpu_seconds"] / row[f"{ours}_cpu_seconds"]
        for other in ("nnunet_torchres", *diagnostic_runs):
            if other in results:
                row[f"dsc_nnunet_vs_{other}"] = dice(masks["nnunet"], masks[other])
        table.append(row)

    nnunet_versions = versions(args.nnunet_python)
    summary = {
        "benchmark": "parity with nnU-Net v2 nnUNetPredictor (CPU)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(torch_threads=args.threads),
        "versions": {"ours": {**versions(sys.executable), "git_commit": git_commit()},
                     "nnunet_env": nnunet_versions},
        "model": {"folder": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
                  "training": _read_json(model / "blob_training.json", exclude=("intensity_properties",)),
                  "patch_size": list(PATCH_SIZE)},
        "settings": {
            "nnunet": "nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, "
                      "perform_everything_on_device=False, device=cpu); resampling as in plans.json",
            "nnunet_torchres": "same, with resample_torch_fornnunet (is_seg, force_separate_z=False) for "
                               "data, seg and probabilities, as nnU-Net's *_torchres planners write",
            "nnunet_torch_input_only": "torch resampler for data and seg only (last round only)",
            "nnunet_torch_export_only": "torch resampler for probabilities only (last round only)",
            "ours_same_settings": "python -m inference " + " ".join(runs["ours_same_settings"][2:]),
            "ours_defaults": "python -m inference " + " ".join(runs["ours_defaults"][2:]),
            "seconds": "per case, model load excluded, reading, preprocessing, network, export and "
                       "writing included; the fastest of `repeats` rounds (engines taking turns)",
            "repeats": args.repeats,
        },
        "runs": {name: {"per_case_fastest_round": r["per_case"], "rounds": r["rounds"]}
                 for name, r in results.items()},
        "cases": table,
        "mean": _means(table),
    }
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(results_dir / "parity_nnunet.json", json.dumps(summary, indent=2, default=str))
    write_text_atomically(results_dir / "parity_nnunet.md", markdown(summary))
    print(markdown(summary))
    return 0


def _read_json(path: Path, exclude=()) -> dict | None:
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in exclude}
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _means(table: list[dict]) -> dict:
    keys = [k for k in table[0]
            if k.startswith(("dsc_", "speedup_", "cpu_speedup_")) or k.endswith(("_seconds", "_truth"))]
    return {k: float(np.mean([row[k] for row in table])) for k in keys}


def markdown(summary: dict) -> str:
    rows, mean = summary["cases"], summary["mean"]
    machine, versions_ = summary["machine"], summary["versions"]
    peers = [n for n in ("nnunet", "nnunet_torchres") if f"dsc_ours_same_settings_vs_{n}" in rows[0]]
    ours = ("ours_same_settings", "ours_defaults")
    label = {"nnunet": "nnU-Net", "nnunet_torchres": "nnU-Net torchres",
             "ours_same_settings": "ours (same settings)", "ours_defaults": "ours (defaults)"}
    lines = [
        "# Parity with nnU-Net v2 (`nnUNetPredictor`), CPU",
        "",
        f"{summary['date']} · {machine['cores']} CPUs ({machine['cpu']}) · {machine['platform']} · "
        f"{machine['torch_threads']} torch thread(s) for both engines · ours: torch "
        f"{versions_['ours'].get('torch')}, commit {versions_['ours'].get('git_commit')} · peer: nnunetv2 "
        f"{versions_['nnunet_env'].get('nnunetv2')}, torch {versions_['nnunet_env'].get('torch')}",
        "",
        f"Model: `{summary['model']['folder']}` (PlainConvUNet, 4 stages, patch {summary['model']['patch_size']} "
        "at 2 mm, trained on synthetic blobs by `training/make_blob_model.py`). How to reproduce and how to "
        "read this: docs/parity.md.",
        "",
        "- **nnU-Net**: " + summary["settings"]["nnunet"],
    ]
    if "nnunet_torchres" in peers:
        lines.append("- **nnU-Net torchres**: " + summary["settings"]["nnunet_torchres"])
    lines += [f"- **ours (same settings)**: `{summary['settings']['ours_same_settings']}`",
              f"- **ours (defaults)**: `{summary['settings']['ours_defaults']}`", "",
              "## Agreement (Dice between the two engines' masks)", "",
              "| case | size (z,y,x) | spacing (mm) | "
              + " | ".join(f"{label[o]} ↔ {label[p]}" for o in ours for p in peers) + " |",
              "|---|---|---|" + "---|" * (len(ours) * len(peers))]
    for r in rows:
        lines.append(f"| {r['case']} | {'×'.join(map(str, r['shape_zyx']))} | "
                     f"{'×'.join(f'{v:g}' for v in r['spacing_zyx'])} | "
                     + " | ".join(f"{r[f'dsc_{o}_vs_{p}']:.4f}" for o in ours for p in peers) + " |")
    lines.append("| **mean** | | | " + " | ".join(f"**{mean[f'dsc_{o}_vs_{p}']:.4f}**"
                                                 for o in ours for p in peers) + " |")
    engines = peers + list(ours)
    lines += ["", "## Seconds per case (wall / CPU) and speed-up (nnU-Net ÷ ours)", "",
              "| case | " + " | ".join(label[e] for e in engines) + " | "
              + " | ".join(f"{label[o]} vs {label[p]}" for o in ours for p in peers) + " |",
              "|---|" + "---|" * (len(engines) + len(ours) * len(peers))]
    for r in rows + [dict(mean, case="**mean**")]:
        lines.append(f"| {r['case']} | "
                     + " | ".join(f"{r[f'{e}_seconds']:.1f} / {r[f'{e}_cpu_seconds']:.1f}" for e in engines)
                     + " | " + " | ".join(f"{r[f'speedup_{o}_vs_{p}']:.2f}× / {r[f'cpu_speedup_{o}_vs_{p}']:.2f}×"
                                          for o in ours for p in peers) + " |")
    names = list(summary["runs"])
    lines += ["", "Seconds per case exclude model loading and include reading, preprocessing, the network, "
              "export and writing; wall and CPU seconds are each the smallest of "
              f"{summary['settings']['repeats']} rounds in which the engines took turns.", "",
              "## Against the synthetic ground truth (Dice) and output geometry", "",
              "| case | lesion voxels | " + " | ".join(names) + " | geometry = input |",
              "|---|---|" + "---|" * len(names) + "---|"]
    for r in rows:
        geometry_ok = all(r[f"{n}_geometry_matches_input"] for n in names)
        lines.append(f"| {r['case']} | {r['lesion_voxels']} | "
                     + " | ".join(f"{r[f'{n}_dsc_vs_truth']:.4f}" for n in names)
                     + f" | {'yes' if geometry_ok else 'NO'} |")
    others = [n for n in ("nnunet_torchres", "nnunet_torch_input_only", "nnunet_torch_export_only")
              if f"dsc_nnunet_vs_{n}" in rows[0]]
    if others:
        lines += ["", "## nnU-Net against itself: what its resampling choice alone changes", "",
                  "Dice between nnU-Net's masks with its plans' resampling (scikit-image: cubic for the image, "
                  "linear for the logits, nearest along z where the spacing is anisotropic > 3) and with its "
                  "torch resampler (trilinear, as our engine) on the way in, out, or both:", "",
                  "| case | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for r in rows:
            lines.append(f"| {r['case']} | " + " | ".join(f"{r[f'dsc_nnunet_vs_{n}']:.4f}" for n in others)
                         + " |")
    lines += ["", "Whole runs (process start, imports and model load included), per round — wall s / CPU s:",
              ""]
    for name, run in summary["runs"].items():
        lines.append(f"- {name}: " + ", ".join(f"{r['wall_seconds_incl_start_and_load']:.1f} / "
                                                 f"{r['cpu_seconds']:.1f}" for r in run["rounds"]))
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
