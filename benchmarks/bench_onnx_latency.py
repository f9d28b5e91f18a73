"""Time a window adds to the sliding window on the CPU, three ways, same model, same windows, same run
(the ways alternate group by group, so that load from other processes hits all of them):

  torch                    the torch backend, torch.set_num_threads(cores), one window at a time
  ORT, cores on a window   ONNX Runtime with intra-op threads = cores, one window at a time (our CPU path until
                           session 21)
  ORT, a window a core     the engine's CPU path (--backend auto / onnx): on 2 cores, two single-threaded
                           windows at once from two threads (sliding_window.in_order, onnx_loader.cpu_lanes);
                           on more cores the same as "cores on a window"

    .venv/bin/python benchmarks/bench_onnx_latency.py [-m models/default] [--groups 8] [--warmup 2]
                                                      [--threads N] [--no-representative]

Seconds a window = a group of `threads` windows' wall time / `threads`. Models measured:
  * `-m` (default models/default) when it exists, at its inference patch (training patch x 1.2, rounded
    to the stride), else a model of the same architecture as training/train_default.py builds (random
    weights: latency does not depend on them);
  * a representative nnU-Net-like PlainConvUNet (5 stages, 32..320 features) at its 96^3 training
    patch, unless --no-representative.
Each is exported with inference.export_onnx into a temporary copy of its folder (the model folder itself
is not touched) and run through the callables the pipeline uses (load_model(..., backend=...)). The logits
of the three are compared: "a window a core" must equal "cores on a window" to the bit.
Writes results/onnx_latency.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from flare_common.machine import cpu_label, machine_facts
from inference.backends import OnnxRuntimeNetwork
from inference.export_onnx import export_fold
from inference.model import load_model
from inference.model.onnx_loader import session_options
from inference.network_plan import enlarged_patch_size, window_lanes
from inference.sliding_window import in_order
from training.model_folder import (SYNTHETIC_CT_INTENSITIES, make_dataset_json, make_plans,
                                    plain_unet_arch_kwargs, write_random_model_folder)

REPO = Path(__file__).resolve().parent.parent


RESULTS = REPO / "results"
# the architecture of training/train_default.py, for when models/default has not been trained yet
DEFAULT_ARCHITECTURE = dict(n_stages=5, base_features=12, max_features=192, patch=(64, 64, 64))
REPRESENTATIVE = dict(n_stages=5, base_features=32, max_features=320, patch=(96, 96, 96))
TORCH, ORT_ALL_CORES, ORT_LANES = "torch", "ORT, cores on a window", "ORT, a window a core"


def random_model_folder(out_dir: Path, n_stages: int, base_features: int, max_features: int,
                        patch: tuple[int, ...]) -> Path:
    arch = plain_unet_arch_kwargs(n_stages, base_features=base_features, max_features=max_features)
    plans = make_plans(spacing=[3.0, 3.0, 3.0], patch_size=list(patch), arch_kwargs=arch,
                       intensity_properties=SYNTHETIC_CT_INTENSITIES)
    return write_random_model_folder(out_dir, plans, make_dataset_json())


def copy_model_folder(source: Path, out_dir: Path) -> Path:
    """plans, dataset and fold_all's final checkpoint: enough to export without touching `source`."""
    (out_dir / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "fold_all/checkpoint_final.pth"):
        shutil.copy2(source / name, out_dir / name)
    return out_dir


def ort_on_all_cores(network: OnnxRuntimeNetwork, threads: int) -> OnnxRuntimeNetwork:
    """The same export in a session whose intra-op threads are `threads`, one window at a time."""
    import onnxruntime as ort

    options = session_options(on_gpu=False)
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(network.source), options, providers=["CPUExecutionProvider"])
    return OnnxRuntimeNetwork(session, torch.device("cpu"), source=network.source, lanes=1)


def time_windows(networks: dict, patch: tuple[int, ...], channels: int, threads: int, groups: int,
                 warmup: int) -> dict:
    """Seconds a window adds for each way: groups of `threads` windows, through in_order with each network's
    lanes (1: one after another), the ways alternating group by group."""
    generator = torch.Generator().manual_seed(0)
    seconds = {name: [] for name in networks}
    differences = {name: 0.0 for name in networks}
    for index in range(warmup + groups):
        windows = [torch.randn((1, channels, *patch), generator=generator) for _ in range(threads)]
        outputs = {}
        for name, network in networks.items():
            start = time.perf_counter()
            outputs[name] = list(in_order(network, windows, window_lanes([network])))
            if index >= warmup:
                seconds[name].append((time.perf_counter() - start) / threads)
        reference = outputs[ORT_ALL_CORES]
        for name, logits in outputs.items():
            differences[name] = max(differences[name], max((a - b).abs().max().item()
                                                           for a, b in zip(logits, reference)))
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "all_s": s,
                   "max_abs_logits_diff_vs_ort_cores": differences[name]} for name, s in seconds.items()}


def measure(label: str, model_dir: Path, patch: tuple[int, ...] | None, threads: int, groups: int,
            warmup: int) -> dict:
    export = export_fold(model_dir, "all")
    torch_model = load_model(model_dir, device="cpu")
    onnx_model = load_model(model_dir, device="cpu", backend="onnx")
    config = torch_model.config
    patch = patch or enlarged_patch_size(config.patch_size, config.total_stride,
                                         [10 ** 6] * len(config.patch_size), 1.2)
    print(f"{label}: patch {'x'.join(map(str, patch))}, {groups} groups of {threads} windows after {warmup}",
          flush=True)
    networks = {TORCH: torch_model.networks[0], ORT_ALL_CORES: ort_on_all_cores(onnx_model.networks[0], threads),
                ORT_LANES: onnx_model.networks[0]}
    timing = time_windows(networks, patch, config.num_input_channels, threads, groups, warmup)
    parameters = sum(p.numel() for p in torch_model.networks[0].module.parameters())
    print("  " + ", ".join(f"{name} {t['median_s']:.3f} s" for name, t in timing.items()) + " a window (median)",
          flush=True)
    features = config.arch_kwargs["features_per_stage"]
    return {"model": label, "network": config.network_class_name.rsplit(".", 1)[-1],
            "stages": config.arch_kwargs["n_stages"], "features": f"{features[0]}..{features[-1]}",
            "parameters": parameters, "training_patch": list(config.patch_size), "patch": list(patch),
            "onnx_file_mb": round(export.path.stat().st_size / 2 ** 20, 2),
            "export_max_abs_diff": export.max_abs_diff, "ways": timing}


def machine_info(threads: int) -> dict:
    import onnxruntime as ort
    return machine_facts(threads=threads, onnxruntime=ort.__version__,
                         onnxruntime_providers=ort.get_available_providers())


def write_markdown(report: dict, path: Path) -> None:
    machine = report["machine"]
    lines = [
        "# Time a window adds to the sliding window on the CPU: torch, ONNX Runtime on all cores, ONNX Runtime "
        "a window a core", "",
        f"Date (UTC): {report['date']}. Machine: {cpu_label(machine)}, {machine['cores']} logical CPUs, "
        f"{machine['threads']} threads; torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in report['load_average_at_end'])} (a shared machine: the ways alternate "
        "group by group so that all see the same load).", "",
        f"Median of {report['groups']} groups of {machine['threads']} windows after {report['warmup']} warm-up "
        "groups, fp32, batch 1, seconds a window = the group's wall time / its windows. Command: `"
        + report["command"] + "`.", "",
        f"| model | params | patch | {TORCH} | {ORT_ALL_CORES} | {ORT_LANES} | {ORT_ALL_CORES} / {ORT_LANES} | "
        f"{TORCH} / {ORT_LANES} | max abs logits diff, {ORT_LANES} vs {ORT_ALL_CORES} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["models"]:
        ways = row["ways"]
        median = {name: ways[name]["median_s"] for name in ways}
        lines.append(
            f"| {row['model']} ({row['network']} {row['stages']} stages, {row['features']} features) | "
            f"{row['parameters'] / 1e6:.2f} M | {'x'.join(map(str, row['patch']))} | "
            + " | ".join(f"{median[name]:.4f} (min {ways[name]['min_s']:.4f})" for name in (TORCH, ORT_ALL_CORES,
                                                                                         ORT_LANES))
            + f" | {median[ORT_ALL_CORES] / median[ORT_LANES]:.2f}x | {median[TORCH] / median[ORT_LANES]:.2f}x | "
            f"{ways[ORT_LANES]['max_abs_logits_diff_vs_ort_cores']:.1e} |")
    lines += ["", "GPU (CUDAExecutionProvider fp16 / TensorRT) is not measured here: no GPU on this machine.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=str(REPO / "models" / "default"))
    parser.add_argument("--patch", type=int, nargs=3, default=None,
                        help="window size (default: the model's training patch x 1.2)")
    parser.add_argument("--groups", type=int, default=8, help="groups of --threads windows timed per way")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-representative", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "onnx_latency"), help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(["python benchmarks/bench_onnx_latency.py", *sys.argv[1:]]),
              "machine": machine_info(args.threads), "groups": args.groups, "warmup": args.warmup,
              "models": []}
    patch = tuple(args.patch) if args.patch else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model)
        if (model_dir / "fold_all" / "checkpoint_final.pth").is_file():
            label = str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir)
            source = copy_model_folder(model_dir, tmp / "default")
        else:
            print(f"{model_dir} has no fold_all/checkpoint_final.pth; measuring its architecture "
                  "(training/train_default.py) with random weights", flush=True)
            label = "default architecture (random weights)"
            source = random_model_folder(tmp / "default", **DEFAULT_ARCHITECTURE)
        report["models"].append(measure(label, source, patch, args.threads, args.groups, args.warmup))
        if not args.no_representative:
            source = random_model_folder(tmp / "representative", **REPRESENTATIVE)
            report["models"].append(measure("representative nnU-Net-like (random weights)", source,
                                            patch or REPRESENTATIVE["patch"], args.threads, args.groups,
                                            args.warmup))
    report["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
