"""What to do when the GPU runs out of memory in the sliding window: a list of ways to run it, each asking
less of the GPU than the one before, tried in turn by pipeline.model_space_logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .model import LoadedModel
from .patch_policy import smaller_patch
from .sliding_window import sliding_window_logits, window_lanes

if TYPE_CHECKING:
    from .pipeline import PredictionSettings


@dataclass
class Attempt:
    """One way to run the sliding window; the next one is tried when the GPU runs out of memory."""

    label: str
    patch: tuple[int, ...]
    accumulate_on: torch.device | None = None  # None: where the volume is
    networks_on_cpu: bool = False


def out_of_memory_attempts(patch: tuple[int, ...], model: LoadedModel) -> list[Attempt]:
    """On CUDA: the chosen patch; then its logits accumulated on the CPU; then a smaller patch; then the
    network on the CPU (torch models). Elsewhere only the first: a CPU out of memory has no fallback."""
    attempts = [Attempt("", patch)]
    if model.device.type != "cuda":
        return attempts
    cpu, smaller = torch.device("cpu"), smaller_patch(patch, model)
    attempts += [Attempt("the logits accumulated on the CPU", patch, cpu),
                 Attempt(f"the smaller patch {'x'.join(map(str, smaller))}", smaller, cpu)]
    if all(hasattr(network, "on") for network in model.networks):
        attempts.append(Attempt("the network on the CPU", smaller, cpu, networks_on_cpu=True))
    return attempts


def run_attempt(volume: torch.Tensor, model: LoadedModel, settings: "PredictionSettings",
                attempt: Attempt) -> torch.Tensor:
    networks = model.networks
    if attempt.networks_on_cpu:
        networks, volume = [network.on(attempt.accumulate_on) for network in networks], volume.cpu().float()
    try:
        return sliding_window_logits(volume, networks, attempt.patch, model.config.num_classes,
                                     step_size=settings.step_size, accumulate_on=attempt.accumulate_on,
                                     mirror_axes=model.mirror_axes if settings.tta else (),
                                     progress=settings.progress, lanes=window_lanes(networks))
    finally:
        if attempt.networks_on_cpu:  # back where the next case expects them
            for network in model.networks:
                network.on(model.device)
