"""Our side of benchmarks/parity_nnunet.py: exactly `python -m inference ARGS --sequential`, with the CPU
seconds of each case added to its --timings entry (as benchmarks/_nnunet_side.py records them for nnU-Net).

On a machine shared with other work, CPU seconds are a steadier measure than wall seconds; one case at a time
(--sequential) makes the process's CPU seconds between two results that case's own.
"""
from __future__ import annotations

import sys
import time

from inference import batch, cli

_predict_cases = batch.predict_cases


def predict_cases_with_cpu_seconds(*args, **kwargs):
    kwargs["pipelined"] = False
    cpu_start = time.process_time()
    for result in _predict_cases(*args, **kwargs):
        if result.report is not None:
            result.report.seconds["cpu"] = time.process_time() - cpu_start
        cpu_start = time.process_time()
        yield result


if __name__ == "__main__":
    batch.predict_cases = predict_cases_with_cpu_seconds  # cli looks it up at call time
    sys.exit(cli.main())
