"""Per-stage wall-clock timings that are honest on CUDA (synchronise before reading the clock), and the
absolute timestamps of a process's start-up, so that a case's timeline can be laid beside a container's
start and end as measured outside it (evaluation/run_efficiency.py)."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

# The stages of one case, in pipeline order, as reports list them (cli.py, benchmarks/bench_flare_sizes.py);
# "filter" only runs when a lesion filter is active.
STAGE_ORDER = ("read", "crop", "resample", "network", "filter", "export", "write")


def process_start_time() -> float | None:
    """When this process started, in seconds since the epoch (Linux /proc; None elsewhere).

    Taken from the kernel rather than from a clock read in Python, so it includes the interpreter's own
    start-up (to the kernel's 10 ms tick). The boot clock is not namespaced, so inside a container the value
    is comparable with timestamps taken outside it.
    """
    try:
        with open("/proc/self/stat") as stat:
            # Field 22 (starttime, clock ticks after boot); the command name before it may hold spaces.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - since_start
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StageTimer:
    """Adds each stage's seconds to `timings[stage]` and its [start, end] wall-clock times (seconds since
    the epoch) to `timings["at"][stage]`."""

    def __init__(self, device: torch.device | None = None, timings: dict | None = None):
        self.device = device
        self.timings = timings if timings is not None else {}

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start, started_at = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self._sync()
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
            self.timings.setdefault("at", {})[stage] = [started_at, time.time()]
