"""What one case took and chose (CaseReport), per-stage wall-clock timings that are honest on CUDA
(synchronise before reading the clock), and the absolute timestamps of a process's start-up, so that a
case's timeline can be laid beside a container's start and end as measured outside it
(evaluation/run_efficiency.py)."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["CaseReport", "STAGE_ORDER", "StageTimer"]

# The stages of one case, in pipeline order, as reports list them (cli.py, benchmarks/bench_flare_sizes.py);
# "filter" only runs when a lesion filter is active.
STAGE_ORDER = ("read", "crop", "resample", "network", "filter", "probability", "export", "write")


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


@dataclass
class CaseReport:
    """One case: each stage's seconds and its [start, end] wall-clock times (seconds since the epoch), the
    inference patch and step used, the windows run, the whole-device GPU peak predicted for the patch (CUDA), and the
    lesions the lesion filter dropped out of those it found (when a filter is active)."""

    seconds: dict[str, float] = field(default_factory=dict)
    spans: dict[str, list[float]] = field(default_factory=dict)
    patch_size: tuple[int, ...] | None = None
    step_size: float | None = None
    predicted_gpu_peak_mb: float | None = None
    lesions_dropped: tuple[int, int] | None = None  # (dropped, found)
    windows: int | None = None  # sliding windows the network ran

    def as_dict(self) -> dict:
        """A case's entry of the CLI's --timings JSON: stage seconds at the top, the spans under "at"."""
        entry: dict = dict(self.seconds)
        if self.spans:
            entry["at"] = dict(self.spans)
        for key in ("patch_size", "step_size", "windows", "predicted_gpu_peak_mb", "lesions_dropped"):
            value = getattr(self, key)
            if value is not None:
                entry[key] = list(value) if isinstance(value, tuple) else value
        return entry


class StageTimer:
    """Adds each stage's seconds to `report.seconds[stage]` and its [start, end] wall-clock times to
    `report.spans[stage]`."""

    def __init__(self, report: CaseReport, device: torch.device | None = None):
        self.device = device
        self.report = report

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
            self.report.seconds[stage] = self.report.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.report.spans[stage] = [started_at, time.time()]
