"""How the network runs one model-space volume, decided in one place: the patch, the step, what happens when the GPU
runs out of memory, and how a time budget is kept. `check_request` refuses, before any case, what the loaded
networks cannot run (they say which patches they take: backends.PatchNetwork.accepted_patches); `network_logits` runs
the sliding window (sliding_window.py) as decided here.

The patch: the training patch enlarged by `patch_scale` (a fully convolutional network accepts it: fewer windows,
less overlap; Bai et al. train at 160^3 and infer at 192^3), rounded to the network's total stride, never larger
than one window covering the volume; or `--patch-size`; or the one patch an export was fixed to. On CUDA with torch,
the largest of that, the training patch and smaller ones whose predicted whole-device peak fits the memory budget
(the memory model: gpu_memory.py). Out of GPU memory: the logits accumulated on the CPU, then a smaller patch, then
the network on the CPU. Short of time (--time-budget): a larger step.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .backends import PatchNetwork, PatchRange
from .errors import ModelError
from .gpu_memory import (ALLOCATOR_OVERHEAD, UNTRACKED_MB, ForwardMemory, accumulators_mb, device_used_mb,
                         forward_allocation_mb)
from .model import LoadedModel
from .model.calibration import Calibration
from .model.plans import scaled_patch
from .settings import PATCH_SCALE, PredictionSettings
from .sliding_window import accumulator_dtype, in_order, predict_window, sliding_window_logits, windows_over

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["calibrated_settings", "check_request", "enlarged_patch_size", "inference_patch_size", "largest_patch",
           "network_logits", "scaled_patch", "settings_from_record", "window_lanes"]

log = logging.getLogger("inference")

# A network's deepest stage needs more than one voxel (instance norm); total stride x 2 guarantees it.
MIN_STRIDES = 2
CHEAPER_STEPS = (0.75, 1.0)  # tried in turn when the time budget is short: fewer windows, less overlap
BUDGET_RESERVE = 0.1  # of the time budget, kept for what follows the network (export, write)


def shown(patch: Sequence[int]) -> str:
    return "x".join(map(str, patch))


# ------------------------------------------------------------------------------------- calibrated settings


def calibrated_settings(model: LoadedModel, **given) -> tuple[PredictionSettings, str]:
    """The settings a case runs with where nothing sets them (settings_from_record with the model's own record, for
    the device it is on); the fields in `given` (a flag's, a caller's) win. With the line that says which."""
    return settings_from_record(model.calibration, model.fingerprint(), model.device.type, **given)


def settings_from_record(calibration: Calibration | None, fingerprint: str, device_kind: str,
                         **given) -> tuple[PredictionSettings, str]:
    """The patch scale, step and crop of a calibration record (model/calibration.py) where it was measured on the model
    of `fingerprint`, else nnU-Net's tiling (the training patch, step 0.5, exact crop); `given` wins. A record of
    another kind of device than `device_kind` (where the networks run) is used, and the line says so."""
    uncalibrated = "nnU-Net's tiling (the training patch, step 0.5, exact crop)"
    if calibration is None:
        return PredictionSettings(**given), (f"uncalibrated: {uncalibrated}; `python -m inference.calibrate` measures "
                                             "faster settings on this model")
    if calibration.model_fingerprint != fingerprint:
        return PredictionSettings(**given), (f"warning: {calibration.source}: measured on other folds, weights, plans "
                                             f"or lesion filter than this run's: not used; {uncalibrated}")
    settings = PredictionSettings(**{**calibration.settings, **given})
    overridden = sorted(set(calibration.settings) & set(given))
    elsewhere = "" if calibration.device == device_kind else (
        f"; measured on {calibration.device}, not on {device_kind}" + (
            f": its precision unmeasured here; `python -m inference.calibrate --device {device_kind}` measures it"
            if device_kind == "cuda" else ""))
    return settings, (f"calibrated ({calibration.source}): patch x{settings.patch_scale:g} of the training patch, "
                      f"step {settings.step_size:g}, {settings.crop} crop"
                      + (f", {calibration.precision}" if device_kind == calibration.device == "cuda" else "")
                      + (f" ({', '.join(overridden)} set by a flag)" if overridden else "") + elsewhere)


# ------------------------------------------------------------------------------------------- which patches


def accepted_patches(model: LoadedModel) -> PatchRange:
    """The patches every fold's network takes (each says: backends.PatchNetwork.accepted_patches). ModelError where
    the folds' exports were fixed to different patches."""
    ranges = [network.accepted_patches() for network in model.networks]
    fixed = {r.fixed for r in ranges if r.fixed is not None}
    if len(fixed) > 1 or (fixed and any(r.fixed is None for r in ranges)):
        listed = ", ".join(shown(r.fixed) if r.fixed else "any" for r in ranges)
        raise ModelError(f"{model.config.model_dir}: the folds' exports take different patches ({listed}); "
                         "export them alike")
    accepted = ranges[0]
    for other in ranges[1:]:
        accepted = accepted.intersection(other)
    return accepted


def enlarged_patch_size(training_patch: Sequence[int], total_stride: Sequence[int], volume_shape: Sequence[int],
                        scale: float = PATCH_SCALE) -> tuple[int, ...]:
    """The training patch x `scale` (scaled_patch), but never larger than needed to cover the volume in one window
    along an axis."""
    cover = [int(math.ceil(size / stride) * stride) for size, stride in zip(volume_shape, total_stride)]
    return tuple(max(train, min(wanted, covered)) for train, wanted, covered
                 in zip(training_patch, scaled_patch(training_patch, total_stride, scale), cover))


def largest_patch(config, settings: PredictionSettings) -> tuple[int, ...]:
    """The largest patch `settings` may ask of a model (a TensorRT engine is built for the training patch up to it):
    --patch-size, else the training patch x --patch-scale."""
    if settings.patch_size is not None:
        return tuple(settings.patch_size)
    return scaled_patch(config.patch_size, config.total_stride, settings.patch_scale)


def check_request(model: LoadedModel, settings: PredictionSettings) -> None:
    """Before any case: the patch asked for (--patch-size, or the training patch x --patch-scale at most) is one the
    network takes and every network takes it; an export fixed to one patch is run at that patch (said once).
    ModelError otherwise, naming the flag to change."""
    config, asked = model.config, settings.patch_size
    stride = config.total_stride
    if asked is not None and any(p <= 0 or p % s for p, s in zip(asked, stride)):
        raise ModelError(f"--patch-size {shown(asked)}: must be a multiple of the network's total stride "
                         f"{shown(stride)} ({config.model_dir / 'plans.json'})")
    accepted = accepted_patches(model)
    source = model.networks[0].source
    if accepted.fixed is not None:
        if asked is not None and tuple(asked) != accepted.fixed:
            raise ModelError(f"{source}: exported for the fixed patch {shown(accepted.fixed)}, not the --patch-size "
                             f"{shown(asked)} asked for; run with --patch-size {' '.join(map(str, accepted.fixed))} "
                             "or export with dynamic axes")
        if asked is None:
            log.info("%s takes only the %s patch it was exported for: windows of %s", source,
                     shown(accepted.fixed), shown(accepted.fixed))
        return
    # the patches a case may take: --patch-size, else from the training patch up to its scaled size
    wanted = [tuple(asked)] if asked is not None else [tuple(config.patch_size), largest_patch(config, settings)]
    refused = [patch for patch in wanted if not accepted.accepts(patch)]
    if refused:
        flag = f"--patch-size {shown(asked)}" if asked is not None else f"--patch-scale {settings.patch_scale:g}"
        raise ModelError(f"{source}: {flag} asks for the {shown(refused[-1])} patch, which this network does not take "
                         f"({accepted.describe()}); load it for that patch or ask for one it takes")


def inference_patch_size(volume: torch.Tensor, model: LoadedModel, settings: PredictionSettings
                         ) -> tuple[tuple[int, ...], float | None]:
    """The patch for this volume (see module doc): (patch, its predicted whole-device peak in MB, None where nothing
    was predicted)."""
    config = model.config
    if settings.patch_size is not None:
        return tuple(settings.patch_size), None
    fixed = accepted_patches(model).fixed
    if fixed is not None:
        return fixed, None
    patch = enlarged_patch_size(config.patch_size, config.total_stride, volume.shape[1:], settings.patch_scale)
    if model.device.type != "cuda" or model.backend != "torch":  # the memory model sees torch's allocations only
        return patch, None
    device, network = model.device, model.networks[0]
    patch, predicted, fits = choose_patch(
        patch, config.patch_size, config.total_stride, volume.shape[1:], config.num_classes,
        settings.gpu_memory_budget_mb, lambda probe: forward_allocation_mb(network, probe, volume.shape[0], device),
        lambda: device_used_mb(device), accumulator_dtype(device, model.precision).itemsize)
    if not fits:
        log.warning("warning: %s: even the %s patch is predicted to need %.0f MB of GPU memory, over the %.0f MB "
                    "budget", config.model_dir, shown(patch), predicted, settings.gpu_memory_budget_mb)
    return patch, round(predicted)


# ------------------------------------------------------------------------- the patch that fits a GPU budget


def round_to_stride(size: float, stride: int) -> int:
    """Nearest multiple of `stride` (halves up), at least one stride."""
    return max(stride, int(size / stride + 0.5) * stride)


def smallest_patch(training: Sequence[int], total_stride: Sequence[int], scale: float) -> tuple[int, ...]:
    """`scale` of the training patch rounded to the stride, never under MIN_STRIDES strides nor over the training
    patch."""
    return tuple(min(t, max(MIN_STRIDES * s, round_to_stride(t * scale, s))) for t, s in zip(training, total_stride))


def candidate_patches(enlarged: Sequence[int], training: Sequence[int], total_stride: Sequence[int],
                      smallest_scale: float = 0.5) -> list[tuple[int, ...]]:
    """Patches to try, largest first: the enlarged patch, the training patch, then the training patch one total
    stride smaller along every axis at a time, down to `smallest_scale` of it."""
    candidates = [tuple(enlarged), tuple(training)]
    floor = smallest_patch(training, total_stride, smallest_scale)
    patch = list(training)
    while True:
        smaller = [max(lo, p - s) for p, lo, s in zip(patch, floor, total_stride)]
        if smaller == patch:
            break
        patch = smaller
        candidates.append(tuple(patch))
    return list(dict.fromkeys(candidates))  # the enlarged patch may be the training patch


def probe_patches(training: Sequence[int], total_stride: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Two patches, about half and three quarters of the training patch, to fit the memory line on."""
    small = smallest_patch(training, total_stride, 0.5)
    large = smallest_patch(training, total_stride, 0.75)
    if large == small:
        large = tuple(p + s for p, s in zip(small, total_stride))
    return small, large


def largest_fitting_patch(candidates: Sequence[tuple[int, ...]], peak_mb: Callable[[tuple[int, ...]], float],
                          budget_mb: float) -> tuple[tuple[int, ...], float, bool]:
    """The first (largest) candidate whose predicted peak is within budget, else the last (smallest): (patch, its
    predicted peak, whether it fits)."""
    for patch in candidates:
        predicted = peak_mb(patch)
        if predicted <= budget_mb:
            return patch, predicted, True
    return candidates[-1], peak_mb(candidates[-1]), False


def choose_patch(enlarged: Sequence[int], training: Sequence[int], total_stride: Sequence[int],
                 volume_shape: Sequence[int], num_classes: int, budget_mb: float,
                 forward_mb: Callable[[tuple[int, ...]], float],
                 device_used_mb: Callable[[], float], value_bytes: int = 2) -> tuple[tuple[int, ...], float, bool]:
    """The largest candidate patch predicted to keep the whole device within `budget_mb`.

    `forward_mb(patch)` runs a probe pass and returns what it allocated; `device_used_mb()` is called after the
    probes (drop their cached blocks first) and returns the whole device's used memory. Returns (patch, predicted
    peak MB, whether it fits)."""
    forward = ForwardMemory.fit([(probe, forward_mb(probe)) for probe in probe_patches(training, total_stride)])
    used_mb = device_used_mb()

    def peak_mb(patch):
        return (used_mb + UNTRACKED_MB
                + ALLOCATOR_OVERHEAD * (accumulators_mb(volume_shape, patch, num_classes, value_bytes)
                                        + forward.predict_mb(patch)))

    return largest_fitting_patch(candidate_patches(enlarged, training, total_stride), peak_mb, budget_mb)


# --------------------------------------------------------------------------------- out of GPU memory


@dataclass(frozen=True)
class Attempt:
    """One way to run the sliding window; the next one is tried when the GPU runs out of memory."""

    label: str
    patch: tuple[int, ...]
    accumulate_on: torch.device | None = None  # None: where the volume is
    networks_on_cpu: bool = False


def smaller_patch(patch: tuple[int, ...], config) -> tuple[int, ...]:
    """The training patch where `patch` is larger, else half of it (rounded up to the network's stride)."""
    return tuple(train if size > train else max(stride, math.ceil(train / 2 / stride) * stride)
                 for size, train, stride in zip(patch, config.patch_size, config.total_stride))


def out_of_memory_attempts(patch: tuple[int, ...], model: LoadedModel) -> list[Attempt]:
    """On CUDA: the chosen patch; then its logits accumulated on the CPU; then a smaller patch, where the networks
    take it; then the networks on the CPU, where they can move there (torch). Elsewhere only the first: a CPU out
    of memory has no fallback."""
    attempts = [Attempt("", patch)]
    if model.device.type != "cuda":
        return attempts
    cpu, smaller = torch.device("cpu"), smaller_patch(patch, model.config)
    attempts.append(Attempt("the logits accumulated on the CPU", patch, cpu))
    if smaller != patch and accepted_patches(model).accepts(smaller):
        attempts.append(Attempt(f"the smaller patch {shown(smaller)}", smaller, cpu))
    if all(network.movable for network in model.networks):
        attempts.append(Attempt("the network on the CPU", attempts[-1].patch, cpu, networks_on_cpu=True))
    return attempts


def window_lanes(networks: Sequence[PatchNetwork]) -> int:
    """How many windows the networks run best at once (ONNX Runtime on a CPU of two cores: two, see
    onnx_loader.cpu_lanes)."""
    return min(network.lanes for network in networks)


def run_attempt(volume: torch.Tensor, model: LoadedModel, settings: PredictionSettings, attempt: Attempt,
                progress: bool = False, region: tuple[slice, ...] | None = None) -> torch.Tensor:
    networks = model.networks
    if attempt.networks_on_cpu:
        networks, volume = [network.on(attempt.accumulate_on) for network in networks], volume.cpu().float()
    try:
        return sliding_window_logits(volume, networks, attempt.patch, model.config.num_classes,
                                     step_size=settings.step_size, accumulate_on=attempt.accumulate_on,
                                     mirror_axes=model.mirror_axes if settings.tta else (),
                                     progress=progress, lanes=window_lanes(networks), region=region,
                                     dtype=accumulator_dtype(attempt.accumulate_on or volume.device, model.precision))
    finally:
        if attempt.networks_on_cpu:  # back where the next case expects them
            for network in model.networks:
                network.on(model.device)


# ---------------------------------------------------------------------------------------- time budget


def seconds_per_window(volume: torch.Tensor, model: LoadedModel, patch: tuple[int, ...], tta: bool) -> float:
    """Wall time a window adds (every fold, every flip), measured on windows of zeros: one window's time, or with
    several lanes (window_lanes) that many windows at once, divided by their number."""
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


def step_for_time_budget(volume: torch.Tensor, model: LoadedModel, settings: PredictionSettings,
                         patch: tuple[int, ...], seconds_left: float, region: tuple[slice, ...] | None = None) -> float:
    """`settings.step_size`, or the first larger step of CHEAPER_STEPS whose predicted network time (windows x the
    measured time of one) fits `seconds_left`; the largest when none fits. A switch is logged."""
    per_window = seconds_per_window(volume, model, patch, settings.tta)
    steps = [settings.step_size] + [step for step in CHEAPER_STEPS if step > settings.step_size]
    windows = {step: windows_over(volume.shape[1:], patch, step, region) for step in steps}
    predicted = {step: windows[step] * per_window for step in steps}
    chosen = next((step for step in steps if predicted[step] <= seconds_left), steps[-1])
    if chosen != settings.step_size:
        log.warning("warning: predicted network time %.1f s (%d windows x %.3f s) over the %.1f s left of the "
                    "time budget: step %g -> %g (%d windows, %.1f s predicted)", predicted[settings.step_size],
                    windows[settings.step_size], per_window, seconds_left, settings.step_size, chosen,
                    windows[chosen], predicted[chosen])
    return chosen


def seconds_left(settings: PredictionSettings, case_started: float, predict_started: float) -> float | None:
    """What the network may take of the case's time budget (time.perf_counter times): the budget less what the case
    took before its prediction started (the read), BUDGET_RESERVE of that kept for what follows the network, less
    what the prediction has taken so far; None without a budget."""
    if settings.time_budget_s is None:
        return None
    budget = settings.time_budget_s - (predict_started - case_started)
    return budget * (1 - BUDGET_RESERVE) - (time.perf_counter() - predict_started)


# -------------------------------------------------------------------------------------------- the run


@dataclass
class NetworkResult:
    """The sliding window's logits [K, z, y, x] and how they were made."""

    logits: torch.Tensor
    patch_size: tuple[int, ...]
    step_size: float
    predicted_gpu_peak_mb: float | None = None
    windows: int | None = None  # how many windows the network ran


def network_logits(volume: torch.Tensor, model: LoadedModel, settings: PredictionSettings,
                   seconds_left: float | None = None, progress: bool = False,
                   region: tuple[slice, ...] | None = None) -> NetworkResult:
    """Sliding-window logits of a model-space volume [C, z, y, x], with the patch and step used; with `region`, of
    the windows that meet it only (the body: sliding_window.sliding_window_logits), on the whole volume's grid.

    With `seconds_left` (a time budget), the step may be enlarged to fit it (step_for_time_budget). Out of GPU
    memory, each of `out_of_memory_attempts` is tried in turn (a warning says which). `progress`: a bar over the
    windows."""
    patch, predicted = inference_patch_size(volume, model, settings)
    if seconds_left is not None:
        settings = replace(settings, step_size=step_for_time_budget(volume, model, settings, patch, seconds_left,
                                                                    region))
    attempts = out_of_memory_attempts(patch, model)
    for attempt, following in zip(attempts, attempts[1:]):
        try:
            logits = run_attempt(volume, model, settings, attempt, progress, region)
            return NetworkResult(logits, attempt.patch, settings.step_size, predicted,
                                 windows_over(volume.shape[1:], attempt.patch, settings.step_size, region))
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("warning: out of GPU memory; retrying with %s", following.label)
    last = attempts[-1]
    return NetworkResult(run_attempt(volume, model, settings, last, progress, region), last.patch,
                         settings.step_size, predicted, windows_over(volume.shape[1:], last.patch, settings.step_size,
                                                                     region))
