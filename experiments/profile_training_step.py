"""Where a CPU training step of the default model goes: operator and resolution level, by torch.profiler.

    python experiments/profile_training_step.py [--model models/default] [--steps 5] [--threads 2]
    python experiments/profile_training_step.py --compare-bf16 [--steps 20]

Builds the model folder's network as training/train_default.py trains it: deep supervision on, channels-last
3D, AdamW, the same loss (`deep_supervision_loss`), a batch of BATCH_SIZE patches at the plans' patch
size. The input is random; a step's cost does not depend on the values. It times `--steps` steps, then
profiles as many again and groups self CPU time two ways. By operator kind: convolution forward,
convolution backward, normalisation, layout copies, optimiser, other. By resolution level: the spatial
size of the operator's first 5-D activation input. Writes experiments/results/training_step_profile.{json,md}.
With --compare-bf16 it instead times fp32 steps against steps whose forward pass runs under bf16 autocast
(measured so far only on an AVX-512 CPU with bf16 instructions) and writes
experiments/results/training_step_bf16.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import profile
from flare_common.machine import cpu_label
from flare_common.files import write_text_atomically
from flare_common.results import EXPERIMENT_RESULTS, display
from flare_common.machine import machine_facts
from inference.model import build_network, read_model_config
from training.train_default import BATCH_SIZE, bottleneck_in_fp32, forward_loss

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_default: see the comment there


REPO = Path(__file__).resolve().parent.parent


OPERATOR_KINDS = (  # first match wins
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("mkldnn_convolution", "conv3d", "_convolution", "convolution")),
    ("normalisation", ("batch_norm", "instance_norm", "group_norm")),
    ("layout copies", ("copy_", "contiguous", "_to_copy", "clone")),
    ("optimiser", ("Optimizer", "addcdiv", "addcmul", "lerp", "sqrt")),
)


def operator_kind(name: str) -> str:
    for kind, needles in OPERATOR_KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other"


def resolution_level(input_shapes, batch_size: int) -> str:
    """'32^3' for an operator whose first 5-D activation input is [N, C, 32, 32, 32]; 'other' without one.
    Activations have the batch first, or 1 (InstanceNorm runs as batch norm on [1, N*C, ...]); weights
    ([C_out, C_in, k, k, k], C_out >= 2 here) do not count."""
    for shape in input_shapes or ():
        if isinstance(shape, (list, tuple)) and len(shape) == 5 and shape[0] in (batch_size, 1):
            spatial = tuple(shape[2:])
            return f"{spatial[0]}^3" if len(set(spatial)) == 1 else "x".join(map(str, spatial))
    return "other"


def training_step(network, optimizer, images, labels, bf16: bool = False):
    loss = forward_loss(network, images, labels, bf16)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def training_setup(model_dir: Path, threads: int, seed: int = 0):
    """The network, optimiser and a random batch, as training/train_default.py trains them."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = read_model_config(model_dir)
    network = build_network(config)
    network.decoder.deep_supervision = True
    network = network.to(memory_format=torch.channels_last_3d).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    patch = tuple(config.patch_size)
    images = torch.randn(BATCH_SIZE, 1, *patch).contiguous(memory_format=torch.channels_last_3d)
    labels = (torch.rand(BATCH_SIZE, *patch) > 0.9).long()
    for _ in range(2):  # warm-up: oneDNN picks its kernels on the first calls
        training_step(network, optimizer, images, labels)
    return network, optimizer, images, labels


def compare_bf16(model_dir: Path, steps: int, threads: int, rounds: int = 3) -> dict:
    """Median step time in fp32 and under bf16 autocast, measured in alternating rounds of `steps` steps so
    that a shared machine's drift hits both alike."""
    network, optimizer, images, labels = training_setup(model_dir, threads)
    bottleneck_in_fp32(network)  # as train_default.py --bf16 trains; outside autocast it changes nothing
    for _ in range(2):  # bf16 has kernels of its own to pick
        training_step(network, optimizer, images, labels, bf16=True)
    seconds = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name in seconds:
            for _ in range(steps):
                start = time.perf_counter()
                training_step(network, optimizer, images, labels, bf16=name == "bf16")
                seconds[name].append(time.perf_counter() - start)
    median = {name: float(np.median(values)) for name, values in seconds.items()}
    return {"threads": threads, "steps_per_precision": steps * rounds,
            "step_seconds_median": {name: round(value, 4) for name, value in median.items()},
            "bf16_speedup": round(median["fp32"] / median["bf16"], 2)}


def profile_steps(model_dir: Path, steps: int, threads: int, seed: int = 0) -> dict:
    network, optimizer, images, labels = training_setup(model_dir, threads, seed)
    patch = tuple(images.shape[2:])
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        training_step(network, optimizer, images, labels)
        seconds.append(time.perf_counter() - start)
    with profile(record_shapes=True) as profiler:
        for _ in range(steps):
            training_step(network, optimizer, images, labels)
    by_kind: dict[str, float] = {}
    by_level: dict[str, float] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        self_ms = event.self_cpu_time_total / 1000.0 / steps
        kind = operator_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + self_ms
        level = resolution_level(event.input_shapes, BATCH_SIZE)
        by_level[level] = by_level.get(level, 0.0) + self_ms
    total = sum(by_kind.values())
    share = lambda table: {k: {"ms": round(v, 1), "share": round(v / total, 3)}  # noqa: E731
                           for k, v in sorted(table.items(), key=lambda item: -item[1])}
    return {"patch_size": list(patch), "batch_size": BATCH_SIZE, "threads": threads,
            "parameters_million": round(sum(p.numel() for p in network.parameters()) / 1e6, 2),
            "step_seconds_median": round(float(np.median(seconds)), 3),
            "profiled_ms_per_step": round(total, 1), "by_operator": share(by_kind), "by_level": share(by_level)}


def markdown(result: dict) -> str:
    p = result["profile"]
    lines = ["# Where a CPU training step goes", "",
             f"Model `{result['model']}` ({p['parameters_million']} M parameters), batch {p['batch_size']} x "
             f"{'x'.join(map(str, p['patch_size']))}, {p['threads']} threads, {cpu_label(result['machine'])}, "
             f"{result['machine']['date']}, torch {result['machine']['torch']}. Reproduce: `{result['command']}`.", "",
             f"Median step (unprofiled): **{p['step_seconds_median']:.3f} s**; profiled self CPU time "
             f"{p['profiled_ms_per_step']:.0f} ms a step.", ""]
    tables = (("operator", p["by_operator"]), ("resolution level (first 5-D activation input)", p["by_level"]))
    for title, table in tables:
        lines += [f"| {title} | ms a step | share |", "|---|---|---|"]
        lines += [f"| {name} | {row['ms']:.1f} | {row['share']:.0%} |" for name, row in table.items()]
        lines.append("")
    return "\n".join(lines)


def write_bf16_comparison(args) -> int:
    result = {"benchmark": "training step, fp32 vs bf16 autocast", "model": display(args.model),
              "command": f"python experiments/profile_training_step.py --compare-bf16 --model {display(args.model)} "
                         f"--steps {args.steps} --threads {args.threads}",
              "machine": machine_facts(), "comparison": compare_bf16(Path(args.model), args.steps, args.threads)}
    c = result["comparison"]
    md = "\n".join([
        "# A CPU training step: fp32 against bf16 autocast", "",
        f"Model `{result['model']}`, {c['threads']} threads, {cpu_label(result['machine'])}, "
        f"{result['machine']['date']}, torch {result['machine']['torch']}, eager, the bf16 steps with the deepest "
        "stage in fp32 (as `training/train_default.py --bf16 --no-compile` trains). "
        f"Reproduce: `{result['command']}`.", "",
        "| precision | median step (s) | steps timed |", "|---|---|---|",
        *[f"| {name} | {value:.4f} | {c['steps_per_precision']} |" for name, value in c["step_seconds_median"].items()],
        "", f"bf16 autocast: **{c['bf16_speedup']:.2f}x** the fp32 step rate. Speed only: whether a model trained "
        "in bf16 reaches the same loss is measured by training it (models/README.md).", ""])
    results = Path(args.results)
    write_text_atomically(results / "training_step_bf16.json", json.dumps(result, indent=2))
    write_text_atomically(results / "training_step_bf16.md", md)
    print(md)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "default"))
    parser.add_argument("--steps", type=int, default=5, help="steps timed, then as many profiled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(EXPERIMENT_RESULTS))
    parser.add_argument("--compare-bf16", action="store_true",
                        help="instead of profiling: time fp32 against bf16 autocast, "
                             "experiments/results/training_step_bf16.{json,md}")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    if args.compare_bf16:
        return write_bf16_comparison(args)
    result = {"benchmark": "training step profile", "model": display(args.model),
              "command": f"python experiments/profile_training_step.py --model {display(args.model)} "
                         f"--steps {args.steps} --threads {args.threads}",
              "machine": machine_facts(), "profile": profile_steps(Path(args.model), args.steps, args.threads)}
    results = Path(args.results)
    write_text_atomically(results / "training_step_profile.json", json.dumps(result, indent=2))
    write_text_atomically(results / "training_step_profile.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
