"""Calibrate models/default on its validation phantoms and publish the evidence.

    .venv/bin/python benchmarks/calibrate_default_model.py [--cases 8] [--seed 8] [--device cpu]

Writes full-size phantoms of the validation seed (models/default: trained on seed 1000, validated on 8), all with
lesions, runs `python -m inference.calibrate -m models/default --images ... --labels ...` (which writes
models/default/inference.json) and turns its record into results/calibration_default_<device>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.calibration_report import calibration_lines
from flare_common.machine import machine_facts
from flare_common.results import REPO, display, write_result
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
        done = subprocess.run([sys.executable, "-m", "inference.calibrate", "-m", str(MODEL), "--images",
                               str(data / "images"), "--labels", str(data / "labels"), "--device", args.device],
                              cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"calibrate_default_model: the calibration failed:\n{done.stderr[-2000:]}")
    record = json.loads((MODEL / "inference.json").read_text())
    machine = machine_facts()
    command = (f".venv/bin/python {display(__file__)} --cases {args.cases} --seed {args.seed} "
               f"--device {args.device}")
    result = {"machine": machine, "command": command, "record": record}
    lines = [f"# Calibration of models/default ({args.device})", "",
             f"Machine: {machine['cpu']}, {machine['date'][:10]}. Command: `{command}`", "",
             f"{args.cases} full-size phantoms of the validation seed {args.seed}, all with lesions.",
             *calibration_lines(record, args.device, "models/default")]
    stem = write_result(f"calibration_default_{args.device}", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {display(stem)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
