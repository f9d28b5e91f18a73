"""Throughput on a batch of cases, in cases per hour, each way of running it measured in the same run:

  (a) `python -m inference --sequential`   one process, one case after another (read, compute, write)
  (b) `python -m inference`                 one process, pipelined (inference/batch.py, the default)
  (c) `python -m inference --ray`           Ray on this machine, 2 workers of 1 core, and 1 worker for scale
  (d) `nnUNetv2_predict_from_modelfolder`   nnU-Net 2.8.1 with its default preprocessing / export workers,
                                            TTA off (--disable_tta), with .venv-nnunet's python

each over the same phantoms, whole command (start-up, model load, Ray's start included) and "batch only" (first
stage to last mask, from the engine's --timings), the default model, with the process tree's CPU time (and with
--device cuda NVML's GPU utilisation) sampled by the efficiency harness's sampler. Masks of (b) and (c) are
compared with (a) voxel for voxel. Then a projection, on paper, of a 10,000-case archive on 8 GPUs from the
per-stage times measured on the H200 (results/flare_sizes_default_nvidia-h200_*).

    .venv/bin/python benchmarks/bench_batch.py [--cases 12] [--device cpu|cuda] [--nnunet-python PATH]

Writes results/batch_throughput_<device>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from evaluation.efficiency_report import auc, mean
from evaluation.resource_sampler import SamplerProcess
from flare_common.machine import cpu_label, device_facts
from flare_common.results import REPO, RESULTS, write_result
from phantoms import write_dataset

SHAPE, SPACING = (64, 192, 192), (4.0, 2.5, 2.5)  # a partial scan at a realistic scale: seconds a case
H200_RESULTS = RESULTS / "flare_sizes_default_nvidia-h200_2026-11-30.json"


def batch_window(timings: Path) -> tuple[float, float] | None:
    """[first stage's start, last stage's end] over the run's cases (its --timings JSON): the batch itself,
    without the start-up, model load (per worker with Ray) and Ray's own start and stop."""
    try:
        cases = json.loads(timings.read_text())["cases"].values()
    except (OSError, ValueError, KeyError):
        return None
    spans = [span for case in cases for span in (case.get("at") or {}).values()]
    return (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None


def run(label: str, argv: list[str], out: Path, gpu_index: int | None = None, ours: bool = True) -> dict:
    """The command, whole, with its process tree's CPU time and (gpu_index) NVML's GPU utilisation sampled
    every 0.1 s by the efficiency harness's sampler; `ours`: our engine, asked for its --timings."""
    out.mkdir(parents=True)
    timings = out.parent / f"{out.name}.timings.json"
    argv = [*argv, "--timings", timings] if ours else argv
    sampler = SamplerProcess(out.parent / f"{out.name}.samples.json", gpu_index)
    start = time.perf_counter()
    process = subprocess.Popen([str(a) for a in argv], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler.follow(process.pid)
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    samples = sampler.stop()
    if process.returncode != 0:
        print(f"bench_batch: {label} failed:\n{stderr[-2000:]}", file=sys.stderr)
    written = len(list(out.glob("*.nii.gz")))
    interval = samples["interval_s"]
    result = {"label": label, "command": " ".join(map(str, argv)).replace(str(REPO) + "/", ""), "seconds": seconds,
              "masks": written, "returncode": process.returncode,
              "cpu_seconds": auc(samples["tree_cpu_percent"], interval, decimals=2) / 100}
    window = batch_window(timings)
    if window is not None:
        result["batch_seconds"] = window[1] - window[0]
    busy = samples.get("gpu_utilization") or []
    if any(value is not None for value in busy):
        result["gpu_busy_percent"] = mean(busy)
        if window is not None:
            inside = [value for at, value in zip(samples["timestamps"], busy) if window[0] <= at <= window[1]]
            result["gpu_busy_percent_in_batch"] = None if math.isnan(mean(inside)) else mean(inside)
    print(f"bench_batch: {label}: {seconds:.1f} s, {written} masks", file=sys.stderr)
    return result


def same_masks(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.nii.gz"))

    def voxels(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    return names == sorted(p.name for p in b.glob("*.nii.gz")) and all(
        np.array_equal(voxels(a / n), voxels(b / n)) for n in names)


def projection() -> dict | None:
    """10,000 cases on 8 H200s from the per-stage times measured there (one process a case). Pipelined, a GPU's
    case rate is set by the slowest of: the network (the GPU), the CPU-side stages (read/decode, export, write,
    which the pipeline overlaps with the network), and the file system's bandwidth shared by 8 GPUs."""
    if not H200_RESULTS.is_file():
        return None
    rows = [r for r in json.loads(H200_RESULTS.read_text())["rows"] if r.get("engine", "").startswith("ours")]
    network = float(np.mean([r["network_s"] for r in rows]))
    cpu_side = float(np.mean([r.get("read_s", 0) + r.get("crop_s", 0) + r.get("resample_s", 0)
                              + r.get("export_s", 0) + r.get("write_s", 0) for r in rows]))
    per_case = max(network, cpu_side)
    gpus, cases = 8, 10_000
    input_mb = 110.0  # a 512x512x554 .nii.gz; a FLARE case averages less
    hours = cases * per_case / gpus / 3600
    return {"gpus": gpus, "cases": cases, "network_s": network, "cpu_side_s": cpu_side, "per_case_s": per_case,
            "limited_by": "GPU (network)" if network >= cpu_side else "CPU-side stages",
            "hours": hours, "file_system_mb_s": gpus * input_mb / per_case,
            "source": str(H200_RESULTS.relative_to(REPO))}


def markdown(result: dict) -> str:
    machine, cases, cores = result["machine"], result["cases"], result["machine"]["cores"]
    gpu = any("gpu_busy_percent" in r for r in result["runs"])
    rows = ["| run | seconds | cases / hour | vs (a) | batch only (s) | cases / hour, batch only | CPU busy | "
            + ("GPU busy, whole run / batch only | " if gpu else "") + "masks |",
            "|---|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|"]
    base = result["runs"][0]["seconds"]
    for r in result["runs"]:
        same = {True: ", identical to (a)", False: ", DIFFER from (a)", None: ""}[r.get("same_as_sequential")]
        batch = r.get("batch_seconds")
        in_batch = r.get("gpu_busy_percent_in_batch")
        busy = (f"{r['gpu_busy_percent']:.0f} % / {'-' if in_batch is None else f'{in_batch:.0f} %'} | "
                if "gpu_busy_percent" in r else ("| " if gpu else ""))
        rows.append(f"| {r['label']} | {r['seconds']:.1f} | {cases * 3600 / r['seconds']:.0f} | "
                    f"{base / r['seconds']:.2f}x | {f'{batch:.1f}' if batch else ''} | "
                    f"{f'{cases * 3600 / batch:.0f}' if batch else ''} | "
                    f"{100 * r['cpu_seconds'] / (r['seconds'] * cores):.0f} % | {busy}{r['masks']}{same} |")
    where = machine.get("gpu") or "CPU"
    lines = [f"# Batch throughput, {cases} phantoms of {'x'.join(map(str, SHAPE))} voxels, on the {where}",
             "", f"{cpu_label(machine)}, {cores} cores, {machine['date']}. Command: `{result['command']}`. "
             "Seconds are the whole command (start-up, model load, Ray's own start and stop included); "
             "\"batch only\" is from the first case's first stage to the last mask written (the engine's "
             "--timings), without them. CPU busy: the command's process tree's CPU time over seconds x cores "
             "(the efficiency harness's sampler, every 0.1 s)"
             + ("; GPU busy: NVML's utilisation, the mean of its 0.1 s samples" if gpu else "")
             + ". The machine is shared, so single runs vary by 10-25 %.", "", *rows, ""]
    sequential = result["runs"][0]
    busy_share = sequential["cpu_seconds"] / (sequential["seconds"] * cores)
    if result["device"] == "cpu" and busy_share > 0:
        lines += [f"The sequential run already kept the {cores} cores {100 * busy_share:.0f} % busy, so no overlap "
                  f"of its stages can make it more than {1 / busy_share:.2f}x faster on this machine: the pipelined "
                  "mode gains where the network leaves the CPU idle while it waits (a GPU), not here.", ""]
    ray2, ray1 = (next((r for r in result["runs"] if r["label"].startswith(prefix)), None)
                  for prefix in ("(c) Ray, 2", "(c) Ray, 1"))
    if ray2 and ray1:
        line = f"Ray with 2 workers against 1: {ray1['seconds'] / ray2['seconds']:.2f}x whole command"
        if ray1.get("batch_seconds") and ray2.get("batch_seconds"):
            line += f", {ray1['batch_seconds'] / ray2['batch_seconds']:.2f}x batch only"
        lines += [line + ".", ""]
    p = result.get("projection")
    if p:
        lines += ["## 10,000 cases on 8 GPUs (projection, not a measurement)", "",
                  f"From the H200 measurements (`{p['source']}`, our engine, one process a case): network "
                  f"{p['network_s']:.2f} s a case, CPU-side stages (read, crop, resample, export, write) "
                  f"{p['cpu_side_s']:.2f} s. Pipelined, a worker's case time is the larger, {p['per_case_s']:.2f} s "
                  f"({p['limited_by']}); with the model loaded once the start-up (about 5 s a case in the per-case "
                  f"runs) is gone. 8 workers: about **{p['hours']:.1f} hours** for 10,000 cases, reading about "
                  f"{p['file_system_mb_s']:.0f} MB/s of compressed CT from the shared file system, which a network "
                  "file system must sustain (else it is the limit). The CPU-side stages need a few cores per GPU; "
                  "on the 2-core machine here they compete with the network for the same cores.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: also NVML's GPU utilisation of GPU 0, and Ray with one worker per GPU")
    parser.add_argument("--nnunet-python", type=Path, default=REPO / ".venv-nnunet" / "bin" / "python",
                        help="python with nnU-Net for run (d); a path that is not a file skips it")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    gpu_index = 0 if args.device == "cuda" else None
    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        write_dataset(work / "data", args.cases, args.seed, shape_zyx=SHAPE, spacing_zyx=SPACING, progress=False)
        images, engine = work / "data" / "images", [sys.executable, "-m", "inference"]
        common = ["-i", images, "-m", args.model, "--device", args.device, "--quiet"]
        # warm the ONNX export cache, so that no run pays for the one-off export
        subprocess.run(engine + common + ["-o", work / "warm"], cwd=REPO, capture_output=True)
        runs = [run("(a) sequential CLI", engine + common + ["-o", work / "a", "--sequential"], work / "a", gpu_index),
                run("(b) pipelined CLI", engine + common + ["-o", work / "b"], work / "b", gpu_index)]
        compared = ["b"]
        if importlib.util.find_spec("ray") is not None:
            ray_runs = [("c1", "(c) Ray, 1 worker" + (" (GPU 0)" if gpu_index is not None else " x 1 core"),
                         ["--ray-workers", "1"])]
            if gpu_index is None:
                ray_runs.insert(0, ("c2", "(c) Ray, 2 workers x 1 core", []))
            for folder, label, extra in ray_runs:
                runs.append(run(label, engine + common + ["-o", work / folder, "--ray", "--journal",
                                                          work / f"{folder}.jsonl", *extra], work / folder, gpu_index))
                compared.append(folder)
        for r, folder in zip(runs[1:], compared):
            r["same_as_sequential"] = same_masks(work / "a", work / folder)
        if args.nnunet_python.is_file():
            predict = args.nnunet_python.parent / "nnUNetv2_predict_from_modelfolder"
            runs.append(run("(d) nnUNetv2_predict, its default workers, TTA off",
                            [predict, "-i", images, "-o", work / "d", "-m", args.model, "-f", "all", "--disable_tta",
                             "-device", args.device, "--disable_progress_bar"], work / "d", gpu_index, ours=False))
        result = {"machine": device_facts(args.device), "device": args.device, "cases": args.cases,
                  "shape_zyx": list(SHAPE), "spacing_zyx": list(SPACING), "seed": args.seed,
                  "command": "python benchmarks/bench_batch.py " + " ".join(sys.argv[1:]), "runs": runs,
                  "projection": projection()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result("batch_throughput", result, markdown(result), args.results)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
