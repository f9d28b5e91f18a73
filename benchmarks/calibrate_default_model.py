"""Calibrate models/default on its validation phantoms and publish the evidence.

    .venv/bin/python benchmarks/calibrate_default_model.py [--cases 8] [--seed 8] [--device cpu]

Writes full-size phantoms of the validation seed (models/default: trained on seed 1000, validated on 8), all with
lesions, runs `python -m inference.calibrate -m models/default --images ... --labels ...` (which writes
models/default/inference.json) and turns its record into results/calibration_default_<device>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.calibration_report import calibrate, publish
from flare_common.results import REPO
from phantoms import generate_phantom, write_case

MODEL = REPO / "models" / "default"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="calibrate-default-") as scratch:
        data = Path(scratch)
        for index in range(args.cases):
            write_case(generate_phantom(args.seed, index, healthy=False), data)
        record = calibrate(MODEL, data, args.device, caller="calibrate_default_model")
    return publish(f"calibration_default_{args.device}", f"# Calibration of models/default ({args.device})", __file__,
                   f"--cases {args.cases} --seed {args.seed} --device {args.device}", record, args.device,
                   "models/default", f"{args.cases} full-size phantoms of the validation seed {args.seed}, all with "
                   "lesions.")


if __name__ == "__main__":
    sys.exit(main())
