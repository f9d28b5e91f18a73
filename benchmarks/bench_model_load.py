"""Model load, from a model folder to a network ready on the device, ours against nnU-Net's in the same run:

  ours   `inference.load_model(folder, backend="torch")`: the network built on the meta device and given the
         checkpoint's tensors (memory-mapped for a GPU), then moved to the device
  peer   `nnUNetPredictor.initialize_from_trained_model_folder` + `load_state_dict` + `.to(device)`, what its
         predictor does before the first window (nnU-Net 2.8.1, .venv-nnunet's python)

for the default model and a FLARE24-winner-sized one (benchmarks/bench_flare_sizes.py --representative, 102 M
parameters of random weights) whose checkpoint also holds an SGD momentum buffer per parameter, as a real
nnU-Net checkpoint does (its `optimizer_state`). Each timing is a fresh process, imports excluded (they are the
same torch either way), CUDA synchronised; the first of `--repeats + 1` runs warms the page cache and is left
out, so the figures are a warm file on a local disk.

    .venv/bin/python benchmarks/bench_model_load.py [--device cpu|cuda] [--repeats 3] [--repo OTHER_CHECKOUT]

`--repo` times "ours" from another checkout of this repository (an earlier commit, for before/after).
Writes results/model_load_<device>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_flare_sizes import representative_model
from flare_common.machine import cpu_label, device_facts
from flare_common.results import REPO, RESULTS, write_result

HOW_OURS_LOADS = ("For a GPU ours memory-maps the checkpoint (the optimizer state is never read; the weights' pages "
                  "are read as they are copied to the device); on the CPU it reads the file, so that the weights do "
                  "not stay pages of it. On either device ours builds the network on the meta device. nnU-Net reads "
                  "the whole checkpoint and initialises the network randomly first.")
SYNC = "torch.cuda.synchronize() if DEVICE == 'cuda' else None"
OURS = f"""
import sys, time, torch
from inference.model import load_model
MODEL, DEVICE = sys.argv[1], sys.argv[2]
start = time.perf_counter()
model = load_model(MODEL, device=DEVICE, backend="torch")
{SYNC}
print(time.perf_counter() - start)
"""
PEER = f"""
import os, sys, time, torch
for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ.setdefault(name, "/nonexistent")
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
MODEL, DEVICE = sys.argv[1], sys.argv[2]
predictor = nnUNetPredictor(device=torch.device(DEVICE), perform_everything_on_device=DEVICE == "cuda",
                            verbose=False, allow_tqdm=False)
start = time.perf_counter()
predictor.initialize_from_trained_model_folder(MODEL, use_folds=("all",), checkpoint_name="checkpoint_final.pth")
predictor.network.load_state_dict(predictor.list_of_parameters[0])
predictor.network = predictor.network.to(predictor.device)
{SYNC}
print(time.perf_counter() - start)
"""


def with_optimizer_state(model_dir: Path) -> Path:
    """The folder's checkpoint with an SGD momentum buffer per parameter (nnU-Net's optimizer_state), once."""
    path = model_dir / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "optimizer_state" not in checkpoint:
        # one buffer per parameter, as the optimizer holds network.parameters(): a tensor shared by two
        # names in the state dict (the decoder's view of the encoder) counts once
        parameters = {t.data_ptr(): t for t in checkpoint["network_weights"].values() if t.is_floating_point()}
        checkpoint["optimizer_state"] = {
            "state": {i: {"momentum_buffer": torch.randn_like(t)} for i, t in enumerate(parameters.values())},
            "param_groups": [{"lr": 0.01, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-05,
                              "nesterov": True, "maximize": False, "foreach": None, "differentiable": False,
                              "fused": None, "params": list(range(len(parameters)))}]}
        torch.save(checkpoint, path)
    return model_dir


def benchmark_models(work: Path) -> dict[str, Path]:
    """The default model and a FLARE24-winner-sized one with its optimizer state, made once in `work`."""
    return {"default": REPO / "models" / "default",
            "representative (ResEnc-L size, + optimizer state)":
                with_optimizer_state(representative_model(work / "representative"))}


def time_load(python: str, code: str, model: Path, device: str, repeats: int, repo: Path | None = None
              ) -> list[float] | str:
    """Seconds to load `model`, one fresh process each, with the engine of checkout `repo` first on the path
    (ours); the first (page cache) run is dropped. A failed run: its error's last line, instead."""
    seconds = []
    env = None
    if repo:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    for _ in range(repeats + 1):
        done = subprocess.run([python, "-c", code, str(model), device], cwd=repo or REPO, capture_output=True,
                              text=True, env=env)
        if done.returncode != 0:
            error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            print(f"bench_model_load: {python} failed on {model}: {error}", file=sys.stderr)
            return error
        seconds.append(float(done.stdout.split()[-1]))
    return seconds[1:]


def markdown(result: dict) -> str:
    machine = result["machine"]
    rows = ["| model | parameters | checkpoint (MB) | ours (s) | nnUNetPredictor (s) | peer / ours |",
            "|---|---|---|---|---|---|"]
    def seconds(value) -> str:  # the median, or why there is none
        return f"{statistics.median(value):.2f}" if isinstance(value, list) else f"failed: {value or 'not run'}"

    for r in result["models"]:
        ours, peer = r["ours_s"], r.get("peer_s")
        both = isinstance(ours, list) and isinstance(peer, list)
        ratio = f"{statistics.median(peer) / statistics.median(ours):.1f}x" if both else ""
        rows.append(f"| {r['name']} | {r['parameters'] / 1e6:.1f} M | {r['checkpoint_mb']:.0f} | "
                    f"{seconds(ours)} | {seconds(peer) if peer is not None else ''} | {ratio} |")
    where = machine.get("gpu") or cpu_label(machine)
    return "\n".join([
        f"# Model load to a network ready on the {result['device'].upper()}", "",
        f"{where}, {machine['cores']} cores, torch {machine['torch']}, {machine['date']}. Command: "
        f"`{result['command']}`" + (f" (ours from `{result['ours_repo']}`)" if result.get("ours_repo") else "")
        + f". Median of {result['repeats']} fresh processes each, imports excluded, warm page cache.", "",
        *rows, "", HOW_OURS_LOADS if not result.get("ours_repo") else "Ours as that checkout loads.", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nnunet-python", type=Path, default=REPO / ".venv-nnunet" / "bin" / "python",
                        help="python with nnU-Net for the peer; a path that is not a file skips it")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose engine is timed as ours")
    parser.add_argument("--work", type=Path, default=None, help="where the model folders go (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = benchmark_models(args.work or Path(tempfile.mkdtemp(prefix="bench_model_load_")))
    rows = []
    for name, folder in models.items():
        checkpoint = folder / "fold_all" / "checkpoint_final.pth"
        weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
        row = {"name": name, "folder": str(folder), "checkpoint_mb": checkpoint.stat().st_size / 2 ** 20,
               "parameters": sum(t.numel() for t in {t.data_ptr(): t for t in weights.values()}.values()),
               "ours_s": time_load(sys.executable, OURS, folder, args.device, args.repeats, args.repo)}
        if args.nnunet_python.is_file():
            row["peer_s"] = time_load(str(args.nnunet_python), PEER, folder, args.device, args.repeats)
        print(f"bench_model_load: {name}: ours {row['ours_s']}, peer {row.get('peer_s')}", file=sys.stderr)
        rows.append(row)
    result = {"machine": device_facts(args.device), "device": args.device, "repeats": args.repeats, "models": rows,
              "command": "python benchmarks/bench_model_load.py " + " ".join(sys.argv[1:]),
              "ours_repo": str(args.repo) if args.repo != REPO else None}
    write_result("model_load", result, markdown(result), args.results)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
