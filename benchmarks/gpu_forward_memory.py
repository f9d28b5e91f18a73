"""GPU memory and time of one sliding-window forward pass, by patch size and precision, on CUDA.

    python benchmarks/gpu_forward_memory.py [--model DIR | --representative] [--patches 128 160 192]
        [--out results/gpu_forward_memory_<device>_<date>.json]

For each patch and precision, in one process: torch's peak allocated and reserved bytes, the whole
device's used memory from NVML right after the pass (CUDA context + what torch's allocator holds: what
the FLARE sampler sees), milliseconds per window (median of 5 after 2 warm-ups) and, for fp16 weights,
the largest logit difference from fp16 autocast on the same input. Precisions:
- `autocast`: fp32 weights, fp16 autocast (what inference/backends.py TorchNetwork does);
- `fp16-weights`: the module cast to fp16, fp16 input, no autocast.
Run it twice, once with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, to see the allocator's share.

    python benchmarks/gpu_forward_memory.py --render A.json B.json ... --markdown results/gpu_forward_memory.md

renders such JSON files (needs no GPU) into one markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from inference.model import build_network, read_model_config

REPO = Path(__file__).resolve().parent.parent


def nvml_used_mb() -> float:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 20


def measure(weights: dict, config, patch: int, precision: str, reference: torch.Tensor | None,
            device: torch.device) -> tuple[dict, torch.Tensor]:
    network = build_network(config)
    network.load_state_dict(weights)
    network = network.to(device).eval()
    dtype = torch.float16 if precision == "fp16-weights" else torch.float32
    network = network.to(dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    patch_input = torch.randn((1, 1, patch, patch, patch), generator=generator).to(device, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=precision == "autocast")
    seconds = []
    with torch.inference_mode(), autocast:
        for i in range(7):
            start = time.perf_counter()
            logits = network(patch_input)
            torch.cuda.synchronize()
            if i >= 2:
                seconds.append(time.perf_counter() - start)
    row = {"patch": patch, "precision": precision,
           "ms_per_window": sorted(seconds)[len(seconds) // 2] * 1e3,
           "max_allocated_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
           "max_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20,
           "nvml_used_after_mb": nvml_used_mb(),
           "weights_mb": sum(p.numel() * p.element_size() for p in network.parameters()) / 2 ** 20}
    logits = logits.float().cpu()
    if reference is not None:
        row["max_abs_diff_vs_autocast"] = (logits - reference).abs().max().item()
        row["argmax_agreement"] = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    del network, patch_input
    torch.cuda.empty_cache()
    return row, logits


def render(paths: list[Path]) -> str:
    """One markdown table over the records of several runs."""
    import pandas as pd

    records = [json.loads(path.read_text()) for path in paths]
    first = records[0]
    lines = ["# GPU memory and time of one forward pass, by patch and precision", "",
             f"Device **{first['device']}**, torch {first['torch']}, {first['date'][:10]}; cuDNN benchmark "
             f"{'on' if first['cudnn_benchmark'] else 'off'}. Produced by `benchmarks/gpu_forward_memory.py` "
             "(see its docstring); the JSON files beside this one hold every number.", "",
             f"- whole device used before CUDA started: {first['nvml_used_before_cuda_mb']:.0f} MB (NVML); "
             f"the CUDA context and the first kernels added {first['cuda_context_mb']:.0f} MB;",
             "- `NVML after` = the whole device right after the passes, before torch's cache is emptied "
             "(context + cached blocks): what a FLARE-style sampler sees.", ""]
    rows = []
    for record, path in zip(records, paths):
        for row in record["rows"]:
            rows.append({"model": Path(record["model"]).name, "allocator": record["allocator"],
                         "patch": f"{row['patch']}^3", "precision": row["precision"],
                         "ms/window": row["ms_per_window"], "weights MB": row["weights_mb"],
                         "max allocated MB": row["max_allocated_mb"], "max reserved MB": row["max_reserved_mb"],
                         "reserved / allocated": row["max_reserved_mb"] / row["max_allocated_mb"],
                         "NVML after MB": row["nvml_used_after_mb"],
                         "max abs logit diff vs autocast": row.get("max_abs_diff_vs_autocast"),
                         "argmax agreement": row.get("argmax_agreement")})
    table = pd.DataFrame(rows)
    lines.append(table.to_markdown(index=False, floatfmt=".4g"))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", type=Path, nargs="+", help="JSON files of earlier runs to tabulate")
    parser.add_argument("--markdown", type=Path, help="with --render: write the table here")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--representative", action="store_true",
                        help="the FLARE24-winner-sized random-weight model of bench_flare_sizes.py")
    parser.add_argument("--patches", type=int, nargs="+", default=[128, 160, 192])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.render:
        text = render(args.render)
        if args.markdown:
            args.markdown.write_text(text)
        print(text)
        return 0
    if not torch.cuda.is_available():
        print("gpu_forward_memory: no CUDA device", file=sys.stderr)
        return 1
    model = args.model
    if args.representative:
        from bench_flare_sizes import representative_model
        model = representative_model(REPO / "data" / "flare_sizes_runs" / "representative_model")
    config = read_model_config(model)
    device = torch.device("cuda")
    before_cuda = nvml_used_mb()
    torch.zeros(1, device=device)
    context_mb = nvml_used_mb() - before_cuda
    torch.manual_seed(0)
    weights = build_network(config).state_dict()
    rows = []
    for patch in args.patches:
        row, reference = measure(weights, config, patch, "autocast", None, device)
        rows.append(row)
        row, _ = measure(weights, config, patch, "fp16-weights", reference, device)
        rows.append(row)
        del reference
        torch.cuda.empty_cache()
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": str(model),
              "allocator": allocator, "nvml_used_before_cuda_mb": before_cuda, "cuda_context_mb": context_mb,
              "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
