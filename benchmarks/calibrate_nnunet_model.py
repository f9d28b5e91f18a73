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
import sys
import tempfile
from pathlib import Path

from benchmarks.calibration_report import calibrate, publish
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
        record = calibrate(model, scratch / "data", args.device, ("-f", "0"), caller="calibrate_nnunet_model")
        plans = json.loads((model / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    return publish(
        f"calibration_nnunet_trained_{args.device}", f"# Calibration of a model folder nnU-Net trained ({args.device})",
        __file__, f"--cases {args.cases} --seed {args.seed} --device {args.device}", record, args.device,
        "the model folder",
        "The model: nnU-Net 2.8.1's own planner, preprocessor and `nnUNetTrainer` (200 iterations on synthetic "
        f"volumes; training patch {configuration['patch_size']} at {configuration['spacing']} mm, transpose_forward "
        f"{plans['transpose_forward']}), fold 0. {args.cases} volumes of its training data's generator from seed "
        f"{args.seed}, which it never saw, with labels.",
        model={"trained_by": "nnU-Net 2.8.1 nnUNetTrainer, 200 iterations (training/nnunet_trained.py)",
               "patch_size": configuration["patch_size"], "spacing": configuration["spacing"],
               "transpose_forward": plans["transpose_forward"]})


if __name__ == "__main__":
    sys.exit(main())
