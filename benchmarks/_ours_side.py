"""Our side of benchmarks/parity_nnunet.py: exactly `python -m inference ARGS`, with the CPU seconds of each
case added to its --timings entry (as benchmarks/_nnunet_side.py records them for nnU-Net).

On a machine shared with other work, CPU seconds are a steadier measure than wall seconds.
"""
from __future__ import annotations

import sys
import time

from inference import cli

_predict_case = cli.predict_case


def predict_case_with_cpu_seconds(*args, **kwargs) -> dict:
    cpu_start = time.process_time()
    timings = _predict_case(*args, **kwargs)
    timings["cpu"] = time.process_time() - cpu_start
    return timings


if __name__ == "__main__":
    cli.predict_case = predict_case_with_cpu_seconds  # main() looks it up at call time
    sys.exit(cli.main())
