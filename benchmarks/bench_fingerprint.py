"""What knowing a model's content costs: the SHA-256 fingerprint (inference/model/fingerprint.py) that every mask,
ONNX export and journal entry carries, on the default model and a FLARE24-winner-sized one (102 M parameters with
an SGD momentum buffer per parameter, as a real nnU-Net checkpoint holds: benchmarks/bench_model_load.py).

  fingerprint, nothing remembered   model_fingerprint with an empty digest cache: every file hashed
  fingerprint, remembered           the same, the digests remembered by file identity (a workstation's rerun)
  fingerprint, cache off            FLARE_CACHE_DIR=off, as in the submission image: hashed every run
  load, no fingerprint              load_model with the fingerprint's thread patched out: the load as it was before
  load                              load_model (torch, on the device), the fingerprint hashed in a thread beside it
  then waited for the fingerprint   from the end of the load to model.fingerprint() returning: what a run that
                                    needs it at once (the ONNX export check, a resumed run) waits beyond the load

Each timing is a fresh process, imports excluded, warm page cache, the measures taken in turn (the first
round of `--repeats + 1` is left out), each load right after an untimed one.

    .venv/bin/python benchmarks/bench_fingerprint.py [--device cpu|cuda] [--repeats 3]

Writes results/fingerprint_<device>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_model_load import benchmark_models
from flare_common.machine import cpu_label, device_facts
from flare_common.results import REPO, RESULTS, display, write_result

CODE = """
import json, sys, time
from inference.model import load_model, model_fingerprint, read_model_config
import torch
MODEL, DEVICE, WHAT = sys.argv[1], sys.argv[2], sys.argv[3]
sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
start = time.perf_counter()
if WHAT == "fingerprint":
    config = read_model_config(MODEL)
    model_fingerprint(config.model_dir, config.configuration,
                      [("all", config.model_dir / "fold_all" / "checkpoint_final.pth")])
    print(json.dumps({"fingerprint": time.perf_counter() - start}))
elif WHAT == "load-alone":
    import inference.model.loader as loader
    loader._HASHING.submit = lambda *args: None  # no fingerprint: the load as it was before it had one
    model = load_model(MODEL, device=DEVICE, backend="torch")
    sync()
    print(json.dumps({"load": time.perf_counter() - start}))
else:
    model = load_model(MODEL, device=DEVICE, backend="torch")
    sync()
    loaded = time.perf_counter()
    model.fingerprint()
    print(json.dumps({"load": loaded - start, "then waited for the fingerprint": time.perf_counter() - loaded}))
"""
MEASURES = {  # label: (what the process does, FLARE_CACHE_DIR: "fresh" = an empty folder each run, "kept", "off")
    "fingerprint, nothing remembered": ("fingerprint", "fresh"),
    "fingerprint, remembered": ("fingerprint", "kept"),
    "fingerprint, cache off": ("fingerprint", "off"),
    "load, no fingerprint": ("load-alone", "off"),
    "load, cache off": ("load", "off"),
}
COLUMNS = ["fingerprint, nothing remembered", "fingerprint, remembered", "fingerprint, cache off",
           "load, no fingerprint: load", "load, cache off: load", "load, cache off: then waited for the fingerprint"]


def timed(model: Path, device: str, repeats: int, work: Path) -> dict[str, list[float]]:
    """Seconds for each column, one fresh process each, the measures taken in turn (round after round, so that a
    drift of the machine falls on all alike); the first round (page cache) left out."""
    seconds: dict[str, list[float]] = {column: [] for column in COLUMNS}
    kept = Path(tempfile.mkdtemp(prefix="kept_", dir=work))
    for round_ in range(repeats + 1):
        for label, (what, cache) in MEASURES.items():
            folder = {"off": "off", "kept": str(kept), "fresh": tempfile.mkdtemp(prefix="fresh_", dir=work)}[cache]
            if what != "fingerprint":
                # a load of the same model just before each timed one: the machine in the same state for both loads
                # (a load right after a hashing process ran 0.3-0.5 s slower on the 2-core CPU, whichever load)
                subprocess.run([sys.executable, "-c", CODE, str(model), device, "load-alone"], cwd=REPO,
                               capture_output=True, env=dict(os.environ, FLARE_CACHE_DIR="off"), check=True)
            done = subprocess.run([sys.executable, "-c", CODE, str(model), device, what], cwd=REPO,
                                  capture_output=True, text=True, env=dict(os.environ, FLARE_CACHE_DIR=folder),
                                  check=True)
            for part, value in json.loads(done.stdout.split("\n")[-2]).items():
                column = label if what == "fingerprint" else f"{label}: {part}"
                if round_:
                    seconds[column].append(value)
    return seconds


def markdown(result: dict) -> str:
    machine = result["machine"]
    rows = ["| model | checkpoint (MB) | " + " | ".join(f"{column} (s)" for column in COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 2) + "|"]
    for model in result["models"]:
        rows.append(f"| {model['name']} | {model['checkpoint_mb']:.0f} | "
                    + " | ".join(f"{statistics.median(model['seconds'][column]):.3f}" for column in COLUMNS) + " |")
    where = machine.get("gpu") or cpu_label(machine)
    return "\n".join([
        f"# The cost of a model's content fingerprint ({result['device'].upper()})", "",
        f"{where}, {machine['cores']} cores, torch {machine['torch']}, {machine['date']}. Command: "
        f"`{result['command']}`. Median of {result['repeats']} fresh processes each, imports excluded, warm page "
        "cache.", "",
        *rows, "",
        "`load, no fingerprint`: load_model with the fingerprint's thread patched out (the load as it was before "
        "masks carried one); `load, cache off`: load_model with the fingerprint hashed in a thread beside it, and "
        "`then waited`: what the CLI then waits for it (it needs it before the first case, for the masks' notes). "
        "The two `load, cache off` columns minus `load, no fingerprint` are what the fingerprint adds to a run "
        "where nothing is remembered. `cache off` is the submission image (FLARE_CACHE_DIR=off: nothing written "
        "inside the container, every run hashes), `remembered` a workstation's rerun (digests remembered by file "
        "identity).", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="where the model folders go (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_fingerprint_"))
    models = benchmark_models(work)
    rows = []
    for name, folder in models.items():
        checkpoint = folder / "fold_all" / "checkpoint_final.pth"
        seconds = timed(folder, args.device, args.repeats, work)
        print(f"bench_fingerprint: {name}: {seconds}", file=sys.stderr)
        shown = display(folder) if folder.is_relative_to(REPO) else "generated: bench_flare_sizes.representative_model"
        rows.append({"name": name, "folder": shown, "checkpoint_mb": checkpoint.stat().st_size / 2 ** 20,
                     "seconds": seconds})
    result = {"machine": device_facts(args.device), "device": args.device, "repeats": args.repeats, "models": rows,
              "command": "python benchmarks/bench_fingerprint.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_result("fingerprint", result, markdown(result), args.results)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
