"""Per-stage wall-clock timings that are honest on CUDA (synchronise before reading the clock)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# The stages of one case, in pipeline order, as reports list them (cli.py, benchmarks/bench_flare_sizes.py);
# "filter" only runs when a lesion filter is active.
STAGE_ORDER = ("read", "crop", "resample", "network", "filter", "export", "write")


class StageTimer:
    def __init__(self, device: torch.device | None = None, timings: dict | None = None):
        self.device = device
        self.timings = timings if timings is not None else {}

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
