"""Calibrate a model folder written by nnU-Net's own planner, preprocessor and trainer, and publish the evidence.

    .venv/bin/python benchmarks/calibrate_nnunet_model.py [--cases 4] [--seed 101] [--device cpu]

The model: training/nnunet_trained.py's (nnU-Net 2.8.1's ExperimentPlanner and nnUNetTrainer, 200 iterations on
synthetic volumes at 1 x 1 x 3 mm, transpose_forward [2, 0, 1]; trained into the cache where it is not there yet).
It is copied, so that the calibration record is written into the copy, not the cached folder the tests use. Cases:
`--cases` volumes of the training data's generator from a seed the model never saw, with labels. Runs `python -m
inference.calibrate -m COPY --images ... --labels ...` and turns its record into
results/calibration_nnunet_trained_<device>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.calibration_report import calibration_lines
from flare_common.machine import machine_facts
from flare_common.results import REPO, display, write_result
from training.nnunet_trained import nnunet_trained_model, write_validation_cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    trained = nnunet_trained_model()
    with tempfile.TemporaryDirectory(prefix="calibrate-nnunet-") as scratch:
        scratch = Path(scratch)
        model = scratch / "model"
        shutil.copytree(trained, model, ignore=shutil.ignore_patterns("*.onnx", "trt_cache"))
        write_validation_cases(scratch / "data", args.cases, args.seed)
        done = subprocess.run([sys.executable, "-m", "inference.calibrate", "-m", str(model), "-f", "0", "--images",
                               str(scratch / "data" / "images"), "--labels", str(scratch / "data" / "labels"),
                               "--device", args.device], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"calibrate_nnunet_model: the calibration failed:\n{done.stderr[-2000:]}")
        record = json.loads((model / "inference.json").read_text())
        plans = json.loads((model / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    machine = machine_facts()
    command = f".venv/bin/python {display(__file__)} --cases {args.cases} --seed {args.seed} --device {args.device}"
    result = {"machine": machine, "command": command, "record": record,
              "model": {"trained_by": "nnU-Net 2.8.1 nnUNetTrainer, 200 iterations (training/nnunet_trained.py)",
                        "patch_size": configuration["patch_size"], "spacing": configuration["spacing"],
                        "transpose_forward": plans["transpose_forward"]}}
    lines = [f"# Calibration of a model folder nnU-Net trained ({args.device})", "",
             f"Machine: {machine['cpu']}, {machine['date'][:10]}. Command: `{command}`", "",
             "The model: nnU-Net 2.8.1's own planner, preprocessor and `nnUNetTrainer` (200 iterations on synthetic "
             f"volumes; training patch {configuration['patch_size']} at {configuration['spacing']} mm, "
             f"transpose_forward {plans['transpose_forward']}), fold 0. {args.cases} volumes of its training data's "
             f"generator from seed {args.seed}, which it never saw, with labels.",
             *calibration_lines(record, args.device, "the model folder")]
    stem = write_result(f"calibration_nnunet_trained_{args.device}", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {display(stem)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
