"""Per-window latency of the network on the CPU: torch backend vs ONNX Runtime backend, same model, same
windows, same run (windows alternate between the backends, so that load from other processes hits both).

    .venv/bin/python benchmarks/bench_onnx_latency.py [-m models/default] [--windows 7] [--warmup 2]
                                                      [--threads N] [--no-representative]

Models measured:
  * `-m` (default models/default) when it exists, at its inference patch (training patch x 1.2, rounded
    to the stride), else a model of the same architecture as training/train_default.py builds (random
    weights: latency does not depend on them);
  * a representative nnU-Net-like PlainConvUNet (5 stages, 32..320 features) at its 96^3 training
    patch, unless --no-representative.
Each is exported with inference.export_onnx into a temporary copy of its folder (the model folder itself
is not touched) and run through exactly the callables the pipeline uses (load_model(..., backend=...)).
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

from flare_common.machine import machine_facts
from inference.export_onnx import export_fold
from inference.model import load_model
from inference.model.folder import (SYNTHETIC_CT_INTENSITIES, make_dataset_json, make_plans,
                                    plain_unet_arch_kwargs, write_random_model_folder)
from inference.patch_policy import enlarged_patch_size

REPO = Path(__file__).resolve().parent.parent


RESULTS = REPO / "results"
# the architecture of training/train_default.py, for when models/default has not been trained yet
DEFAULT_ARCHITECTURE = dict(n_stages=5, base_features=12, max_features=192, patch=(64, 64, 64))
REPRESENTATIVE = dict(n_stages=5, base_features=32, max_features=320, patch=(96, 96, 96))


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


def time_windows(networks: dict, patch: tuple[int, ...], channels: int, windows: int,
                 warmup: int) -> dict:
    """Seconds per window for each backend; backends alternate window by window."""
    generator = torch.Generator().manual_seed(0)
    seconds = {name: [] for name in networks}
    max_diff = 0.0
    for index in range(warmup + windows):
        window = torch.randn((1, channels, *patch), generator=generator)
        outputs = {}
        for name, network in networks.items():
            start = time.perf_counter()
            outputs[name] = network(window)
            elapsed = time.perf_counter() - start
            if index >= warmup:
                seconds[name].append(elapsed)
        max_diff = max(max_diff, (outputs["torch"] - outputs["onnx"]).abs().max().item())
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "all_s": s}
            for name, s in seconds.items()} | {"max_abs_logits_diff": max_diff}


def measure(label: str, model_dir: Path, patch: tuple[int, ...] | None, windows: int,
            warmup: int) -> dict:
    export = export_fold(model_dir, "all")
    torch_model = load_model(model_dir, device="cpu")
    onnx_model = load_model(model_dir, device="cpu", backend="onnx")
    config = torch_model.config
    patch = patch or enlarged_patch_size(config.patch_size, config.total_stride,
                                         [10 ** 6] * len(config.patch_size), 1.2)
    print(f"{label}: patch {'x'.join(map(str, patch))}, {windows} windows after {warmup} warm-up",
          flush=True)
    timing = time_windows({"torch": torch_model.networks[0], "onnx": onnx_model.networks[0]}, patch,
                          config.num_input_channels, windows, warmup)
    parameters = sum(p.numel() for p in torch_model.networks[0].module.parameters())
    speedup = timing["torch"]["median_s"] / timing["onnx"]["median_s"]
    print(f"  torch {timing['torch']['median_s']:.3f} s, onnxruntime {timing['onnx']['median_s']:.3f} s "
          f"per window (median; torch/ORT {speedup:.2f}x); "
          f"max |logits diff| {timing['max_abs_logits_diff']:.2g}",
          flush=True)
    features = config.arch_kwargs["features_per_stage"]
    return {"model": label, "network": config.network_class_name.rsplit(".", 1)[-1],
            "stages": config.arch_kwargs["n_stages"], "features": f"{features[0]}..{features[-1]}",
            "parameters": parameters, "training_patch": list(config.patch_size), "patch": list(patch),
            "onnx_file_mb": round(export.path.stat().st_size / 2 ** 20, 2),
            "export_max_abs_diff": export.max_abs_diff, "torch": timing["torch"], "onnx": timing["onnx"],
            "max_abs_logits_diff": timing["max_abs_logits_diff"], "torch_over_onnx": speedup}


def machine_info(threads: int) -> dict:
    import onnxruntime as ort
    return machine_facts(threads=threads, onnxruntime=ort.__version__,
                         onnxruntime_providers=ort.get_available_providers())


def write_markdown(report: dict, path: Path) -> None:
    machine = report["machine"]
    lines = [
        "# Network latency per sliding-window patch on the CPU: torch vs ONNX Runtime",
        "",
        f"Date (UTC): {report['date']}. Machine: {machine['cpu']}, {machine['cores']} logical CPUs, "
        f"{machine['threads']} threads for both (torch.set_num_threads; ORT intra-op threads = "
        f"torch.get_num_threads()); torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in report['load_average_at_end'])} (a shared machine: other processes "
        "were running; the backends alternate window by window so that both see the same load).",
        "",
        f"Median of {report['windows']} windows after {report['warmup']} warm-up windows, fp32, batch 1, "
        "through the callables the pipeline uses (`load_model(..., backend=...)`). "
        "Command: `" + report["command"] + "`.",
        "",
        "| model | network | params | patch | torch s/window | ONNX Runtime s/window | torch / ORT "
        "(medians) | torch / ORT (minima) | max abs logits diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["models"]:
        lines.append(
            f"| {row['model']} | {row['network']} {row['stages']} stages, {row['features']} features | "
            f"{row['parameters'] / 1e6:.2f} M | {'x'.join(map(str, row['patch']))} | "
            f"{row['torch']['median_s']:.3f} (min {row['torch']['min_s']:.3f}) | "
            f"{row['onnx']['median_s']:.3f} (min {row['onnx']['min_s']:.3f}) | "
            f"{row['torch_over_onnx']:.2f}x | {row['torch']['min_s'] / row['onnx']['min_s']:.2f}x | "
            f"{row['max_abs_logits_diff']:.1e} |")
    lines += ["", "Where the medians and the minima disagree on which backend is faster, the difference is "
              "within the noise of the shared machine.", "",
              "GPU (CUDAExecutionProvider fp16 / TensorRT) is not measured here: no GPU on this machine.",
              ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=str(REPO / "models" / "default"))
    parser.add_argument("--patch", type=int, nargs=3, default=None,
                        help="window size (default: the model's training patch x 1.2)")
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-representative", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "onnx_latency"), help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(["python benchmarks/bench_onnx_latency.py", *sys.argv[1:]]),
              "machine": machine_info(args.threads), "windows": args.windows, "warmup": args.warmup,
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
        report["models"].append(measure(label, source, patch, args.windows, args.warmup))
        if not args.no_representative:
            source = random_model_folder(tmp / "representative", **REPRESENTATIVE)
            report["models"].append(measure("representative nnU-Net-like (random weights)", source,
                                            patch or REPRESENTATIVE["patch"], args.windows, args.warmup))
    report["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
