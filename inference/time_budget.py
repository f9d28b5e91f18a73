"""A per-case time budget (--time-budget): when the sliding window is predicted to overrun what is left of
it, take a larger step, so that a case finishes in time with fewer windows instead of not at all."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from .model import LoadedModel
from .sliding_window import in_order, predict_window, window_count, window_lanes

if TYPE_CHECKING:
    from .pipeline import PredictionSettings

log = logging.getLogger("inference")


CHEAPER_STEPS = (0.75, 1.0)  # tried in turn when the time budget is short: fewer windows, less overlap
BUDGET_RESERVE = 0.1  # of the time budget, kept for what follows the network (export, write)


def seconds_per_window(volume: torch.Tensor, model: LoadedModel, patch: tuple[int, ...], tta: bool) -> float:
    """Wall time a window adds (every fold, every flip), measured on windows of zeros: one window's time, or
    with several lanes (sliding_window.window_lanes) that many windows at once, divided by their number."""
    window = torch.zeros((1, volume.shape[0], *patch), dtype=volume.dtype, device=volume.device)
    lanes = window_lanes(model.networks)

    def predict(_) -> torch.Tensor:
        return predict_window(model.networks, window, model.mirror_axes if tta else ())

    list(in_order(predict, range(lanes), lanes))  # the first calls pay set-up
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    list(in_order(predict, range(lanes), lanes))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return (time.perf_counter() - start) / lanes


def step_for_time_budget(volume: torch.Tensor, model: LoadedModel, settings: "PredictionSettings",
                         patch: tuple[int, ...], seconds_left: float) -> float:
    """`settings.step_size`, or the first larger step of CHEAPER_STEPS whose predicted network time (windows
    x the measured time of one) fits `seconds_left`; the largest when none fits. A switch is logged."""
    per_window = seconds_per_window(volume, model, patch, settings.tta)
    padded = tuple(max(size, p) for size, p in zip(volume.shape[1:], patch))
    steps = [settings.step_size] + [step for step in CHEAPER_STEPS if step > settings.step_size]
    predicted = {step: window_count(padded, patch, step) * per_window for step in steps}
    chosen = next((step for step in steps if predicted[step] <= seconds_left), steps[-1])
    if chosen != settings.step_size:
        first = window_count(padded, patch, settings.step_size)
        log.warning("warning: predicted network time %.1f s (%d windows x %.3f s) over the %.1f s left of the "
                    "time budget: step %g -> %g (%d windows, %.1f s predicted)", predicted[settings.step_size],
                    first, per_window, seconds_left, settings.step_size, chosen,
                    window_count(padded, patch, chosen), predicted[chosen])
    return chosen
