"""Time, whole-device GPU peak and memory-time area of predict.sh on the 8 FLARE case sizes
(512x512x{55,100,150,215,334,448,499,554}), per backend, with per-stage times, through the efficiency
harness (one fresh run of `sh predict.sh` per case, as the organisers do); optionally the peer, nnU-Net's
`nnUNetPredictor`, on the same model and cases in the same run.

    .venv/bin/python benchmarks/bench_flare_sizes.py [--backends torch onnx] [--device cuda] [--max-cases N]
        [--model DIR | --representative] [--cases flare_z055 ...]
        [--peer-python PYTHON [--peer-cases flare_z055 ...]]

`--representative` times a model of the size FLARE24's Task 1 winner shipped (Bai et al., seeds/000:
ResidualEncoderUNet, 6 stages of 32..320 features, about 100 M parameters, 1.4 mm isotropic, training
patch 160^3, inference patch 192^3) with random weights: its masks mean nothing, its time and memory do.
The peer runs `benchmarks/_nnunet_side.py` (use_mirroring off, step 0.5, torch resampler, as ours) with
PYTHON, which must import nnunetv2.

Writes results/flare_sizes_[<model>_]<device>_<date>.json and .md (device name from NVML, else the CPU model).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from evaluation.efficiency_report import case_file
from flare_common.machine import device_tag
from flare_common.results import display
from inference.timing import STAGE_ORDER as STAGES
from training.model_folder import (SYNTHETIC_CT_INTENSITIES, make_dataset_json, make_plans,
                                    plain_unet_arch_kwargs, write_random_model_folder)

REPO = Path(__file__).resolve().parent.parent


def ensure_phantoms(data: Path) -> Path:
    images = data / "images"
    if not images.is_dir() or len(list(images.glob("*_0000.nii.gz"))) < 8:
        subprocess.run([sys.executable, "-m", "phantoms", "--out", str(data), "--cases", "0",
                        "--seed", "0", "--flare-sizes"], cwd=REPO, check=True)
    return images


def representative_model(out_dir: Path) -> Path:
    """nnU-Net's ResEnc-L layout (n_blocks 1,3,4,6,6,6; one decoder conv a stage), as seeds/000 shipped."""
    if (out_dir / "fold_all" / "checkpoint_final.pth").exists():
        return out_dir
    arch = plain_unet_arch_kwargs(6, base_features=32, max_features=320, residual=True,
                                  n_conv_per_stage=[1, 3, 4, 6, 6, 6], n_conv_per_stage_decoder=1)
    plans = make_plans(spacing=[1.4, 1.4, 1.4], patch_size=[160, 160, 160], arch_kwargs=arch,
                       intensity_properties=SYNTHETIC_CT_INTENSITIES, residual=True)
    return write_random_model_folder(out_dir, plans, make_dataset_json())


# The points of a case's timeline the results list (seconds since launch, from the engine's timestamps; see
# evaluation.run_efficiency.engine_timeline): start-up, first window, mask written, process gone.
TIMELINE_POINTS = {"process_start": "python_at", "imports_done": "imports_at", "model_loaded": "model_at",
                   "read": "image_at", "network_start": "first_window_at", "network": "network_done_at",
                   "write": "written_at", "ended": "gone_at"}


def run_harness(images: Path, command: str, out: Path, max_cases: int | None, timeout: int) -> pd.DataFrame:
    """The efficiency harness over `images`, then each case's stage timings (@TIMINGS@/<case>.json) joined in:
    our engine writes {"cases": {case: {stage: s}}, "model_load_s"}, the peer {"cases": ..., "model_load_seconds"}.
    The harness's --timeline adds, for our engine, when each point of TIMELINE_POINTS came."""
    timings_dir = out / "timings"
    timings_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "evaluation.run_efficiency", "--cases", str(images),
            "--command", command.replace("@TIMINGS@", str(timings_dir)), "--out", str(out),
            "--timeout", str(timeout), "--timeline"]
    if max_cases:
        argv += ["--max-cases", str(max_cases)]
    subprocess.run(argv, cwd=REPO, check=False)
    table = pd.read_csv(out / "efficiency.csv")
    for i, (name, case) in enumerate(zip(table["Name"], table["case"])):
        record = json.loads(case_file(out, case, ".json").read_text())
        for point, column in TIMELINE_POINTS.items():
            table.loc[i, column] = (record.get("timeline") or {}).get(point)
        path = timings_dir / f"{name}.json"
        if record.get("engine_case"):  # our engine: what the harness's --timeline collected
            report = {"cases": {name: record["engine_case"]}, "model_load_s": record["engine_case"]["model_load_s"]}
        elif path.exists():  # the peer's own timings file
            report = json.loads(path.read_text())
        else:
            continue
        for stage, seconds in next(iter(report["cases"].values()), {}).items():
            if stage == "model_load_s":
                continue
            if stage == "step_size":
                table.loc[i, stage] = seconds
            elif isinstance(seconds, (int, float)):
                table.loc[i, stage if stage.endswith("_mb") else f"{stage}_s"] = seconds
            elif stage in ("patch_size", "preprocessed_shape") and isinstance(seconds, list):
                table.loc[i, stage] = "x".join(map(str, seconds))
        table.loc[i, "model_load_s"] = report.get("model_load_s", report.get("model_load_seconds"))
    return table


def run_backend(images: Path, backend: str, device: str, model: Path, out: Path, max_cases: int | None,
                timeout: int) -> pd.DataFrame:
    # the harness runs the command through /bin/sh with INPUT_DIR set to a folder holding one case
    command = (f"BACKEND={shlex.quote(backend)} DEVICE={shlex.quote(device)} "
               f"MODEL_DIR={shlex.quote(str(model))} sh predict.sh")
    table = run_harness(images, command, out, max_cases, timeout)
    table.insert(0, "engine", f"ours ({backend})")
    return table


def case_subset(images: Path, cases: list[str] | None, folder: Path) -> Path:
    """`images` itself, or a folder of links to the named cases."""
    if not cases:
        return images
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = folder / f"{case}_0000.nii.gz"
        if not link.exists():
            link.symlink_to((images / link.name).resolve())
    return folder


def run_peer(images: Path, python: str, device: str, model: Path, out: Path, timeout: int,
             resampler: str = "torch", tta: bool = False) -> pd.DataFrame:
    peer_device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    command = (f"{shlex.quote(python)} benchmarks/_nnunet_side.py -i \"$INPUT_DIR\" -o \"$OUTPUT_DIR\" "
               f"-m {shlex.quote(str(model))} --device {peer_device} --resampler {resampler} "
               f"{'--tta ' if tta else ''}--threads {os.cpu_count()} "
               f"--timings \"@TIMINGS@/$(ls \"$INPUT_DIR\").json\"")
    table = run_harness(images, command, out, None, timeout)
    table.insert(0, "engine", "nnUNetPredictor" + PEER_MODES[(resampler, tta)])
    return table


# nnUNetPredictor as we run it beside ours: (resampler, TTA) -> the label's suffix. Our torch resampler and
# no TTA (the like-for-like run of the GPU measurements); its own defaults, with and without TTA.
PEER_MODES = {("torch", False): "", ("plans", False): " (its resampling, TTA off)",
              ("plans", True): " (its defaults, TTA on)"}


def speed_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Per case and per other engine: its whole-process time over the first engine's, in the same run."""
    engines = list(dict.fromkeys(table["engine"]))
    ours = table[table["engine"] == engines[0]].set_index("Name")["Time"]
    rows = []
    for engine in engines[1:]:
        for name, seconds in table[table["engine"] == engine].set_index("Name")["Time"].items():
            if name in ours.index:
                rows.append({"case": name, "engine": engine, "ours_s": ours[name], "theirs_s": seconds,
                             "theirs_over_ours": seconds / ours[name]})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table.assign(slices=table["Name"].str.extract(r"z(\d+)", expand=False).astype(float))
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for engine, rows in table.groupby("engine", sort=False):
        rows = rows.sort_values("slices")
        time_axis.plot(rows["slices"], rows["Time"], "o-", label=engine)
        if rows["MaxGPU_Mem"].notna().any():
            memory_axis.plot(rows["slices"], rows["MaxGPU_Mem"], "o-", label=engine)
    time_axis.axhline(45, color="red", linestyle="--", label="45 s limit")
    memory_axis.axhline(4096, color="red", linestyle="--", label="4 GB limit")
    time_axis.set(xlabel="slices (512 x 512 each)", ylabel="wall time per case (s)", ylim=(0, None))
    memory_axis.set(xlabel="slices (512 x 512 each)", ylabel="whole-device peak GPU memory (MiB)",
                    ylim=(0, None))
    for axis in (time_axis, memory_axis):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--representative", action="store_true",
                        help="time the FLARE24-winner-sized random-weight model instead of --model")
    parser.add_argument("--peer-python", help="python that imports nnunetv2: also run nnUNetPredictor")
    parser.add_argument("--cases", nargs="+", help="case names, e.g. flare_z055 (default: all 8)")
    parser.add_argument("--peer-cases", nargs="+", help="case names for the peer (default: --cases)")
    parser.add_argument("--peer-modes", nargs="+", default=["torch"], choices=["torch", "plans", "plans-tta"],
                        help="nnUNetPredictor runs: torch (our torch resampler, TTA off; default), plans (its "
                             "own resampling, TTA off), plans-tta (its defaults: its resampling, TTA on)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "flare_sizes")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "flare_sizes_runs")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args()
    images = ensure_phantoms(args.data)
    model, label = args.model.resolve(), args.model.name
    if args.representative:
        model, label = representative_model(args.out / "representative_model"), "representative"
    ours_images = case_subset(images, args.cases, args.out / label / "inputs")
    tables = [run_backend(ours_images, b, args.device, model, args.out / label / b, args.max_cases,
                          args.timeout) for b in args.backends]
    if args.peer_python:
        peer_images = case_subset(images, args.peer_cases or args.cases, args.out / label / "peer_inputs")
        for mode in args.peer_modes:
            resampler, tta = mode.removesuffix("-tta"), mode.endswith("-tta")
            tables.append(run_peer(peer_images, args.peer_python, args.device, model,
                                   args.out / label / f"nnunet-{mode}", args.timeout, resampler, tta))
    table = pd.concat(tables, ignore_index=True)
    # results are committed: the repository's own paths in them are written relative to it
    info = json.loads((args.out / label / args.backends[0] / "run_info.json").read_text()
                      .replace(f"{REPO}/", "").replace(f'"{REPO}"', '"."'))
    device_name = (info.get("gpu_name") or (info.get("machine") or {}).get("cpu") or info.get("cpu_model")
                   or "unknown")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    tag = device_tag(device_name)
    stem = args.results / f"flare_sizes_{label}_{tag}_{date}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stage_columns = [f"{s}_s" for s in ("preprocess",) + STAGES]
    if "network_s" in table:  # what the process spends outside the network: start-up, I/O, pre/post, exit
        table["outside_network_s"] = table["Time"] - table["network_s"]
    columns = ["engine", "Name", "status", "Time", "outside_network_s", "MaxGPU_Mem", "predicted_gpu_peak_mb",
               "AUC_GPU_Time", "pass_time", "pass_gpu", "MaxTreeRSS_MB", "model_load_s", "patch_size"]
    columns += stage_columns + [c for c in TIMELINE_POINTS.values() if c in table and table[c].notna().any()]
    columns = [c for c in columns if c in table.columns]
    ratios = speed_ratios(table)
    record = {"device": device_name, "date": date, "model": display(model), "model_label": label,
              "command": " ".join(sys.argv), "run_info": info,
              "rows": json.loads(table[columns].to_json(orient="records")),
              "ratios": json.loads(ratios.to_json(orient="records")) if not ratios.empty else []}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    header = (f"# predict.sh on the 8 FLARE case sizes: model `{label}`\n\nDevice: **{device_name}**, "
              f"{date}, host {info.get('host', '?')}. Command: `{' '.join(sys.argv)}`.\n\n")
    ratio_text = ("\n\nWhole process, another engine's time over the first one's, case by case:\n\n"
                  + ratios.round(2).to_markdown(index=False) if not ratios.empty else "")
    stem.with_suffix(".md").write_text(header + table[columns].round(2).to_markdown(index=False) + ratio_text
                                       + "\n")
    plot(table, stem.with_suffix(".png"), f"{label} model on {device_name}, {date}")
    print(table[columns].round(2).to_string(index=False))
    return 0 if (table["status"] == "ok").all() else 1


if __name__ == "__main__":
    sys.exit(main())
