"""Which inference patch to use, in one place: the training patch enlarged by PATCH_SCALE (a fully
convolutional network accepts it: fewer windows, less overlap; Bai et al. train at 160^3 and infer at 192^3),
rounded to the network's total stride; on CUDA the largest of that, the training patch and smaller ones
whose predicted whole-device peak fits the memory budget (the memory model: gpu_memory.py); after an
out-of-memory error, a smaller one; for a TensorRT engine, the range of patches to build it for.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .errors import ModelError
from .gpu_memory import (ALLOCATOR_OVERHEAD, UNTRACKED_MB, ForwardMemory, accumulators_mb, device_used_mb,
                         forward_allocation_mb)

if TYPE_CHECKING:
    from .model import LoadedModel
    from .pipeline import PredictionSettings

log = logging.getLogger("inference")

PATCH_SCALE = 1.2  # the inference patch, as a multiple of the training patch
# A network's deepest stage needs more than one voxel (instance norm); total stride x 2 guarantees it.
MIN_STRIDES = 2


def scaled_patch(training_patch: Sequence[int], total_stride: Sequence[int], scale: float = PATCH_SCALE
                 ) -> tuple[int, ...]:
    """The training patch x `scale`, rounded up to the network's total stride (never below the training patch)."""
    return tuple(max(train, int(math.ceil(train * scale / stride) * stride))
                 for train, stride in zip(training_patch, total_stride))


def enlarged_patch_size(training_patch: Sequence[int], total_stride: Sequence[int],
                        volume_shape: Sequence[int], scale: float = PATCH_SCALE) -> tuple[int, ...]:
    """An inference patch `scale` times the training patch (a fully convolutional net accepts it;
    fewer windows, less overlap: Bai et al. train at 160^3 and infer at 192^3), rounded to the network's
    total stride, but never larger than needed to cover the volume in one window along an axis."""
    cover = [int(math.ceil(size / stride) * stride) for size, stride in zip(volume_shape, total_stride)]
    return tuple(max(train, min(wanted, covered)) for train, wanted, covered
                 in zip(training_patch, scaled_patch(training_patch, total_stride, scale), cover))


def round_to_stride(size: float, stride: int) -> int:
    """Nearest multiple of `stride` (halves up), at least one stride."""
    return max(stride, int(size / stride + 0.5) * stride)


def smallest_patch(training: Sequence[int], total_stride: Sequence[int], scale: float) -> tuple[int, ...]:
    """`scale` of the training patch rounded to the stride, never under MIN_STRIDES strides nor over the
    training patch."""
    return tuple(min(t, max(MIN_STRIDES * s, round_to_stride(t * scale, s))) for t, s in zip(training, total_stride))


def candidate_patches(enlarged: Sequence[int], training: Sequence[int], total_stride: Sequence[int],
                      smallest_scale: float = 0.5) -> list[tuple[int, ...]]:
    """Patches to try, largest first: the enlarged patch, the training patch, then the training patch
    one total stride smaller along every axis at a time, down to `smallest_scale` of it."""
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
    """The first (largest) candidate whose predicted peak is within budget, else the last (smallest):
    (patch, its predicted peak, whether it fits)."""
    for patch in candidates:
        predicted = peak_mb(patch)
        if predicted <= budget_mb:
            return patch, predicted, True
    return candidates[-1], peak_mb(candidates[-1]), False


def choose_patch(enlarged: Sequence[int], training: Sequence[int], total_stride: Sequence[int],
                 volume_shape: Sequence[int], num_classes: int, budget_mb: float,
                 forward_mb: Callable[[tuple[int, ...]], float],
                 device_used_mb: Callable[[], float]) -> tuple[tuple[int, ...], float, bool]:
    """The largest candidate patch predicted to keep the whole device within `budget_mb`.

    `forward_mb(patch)` runs a probe pass and returns what it allocated; `device_used_mb()` is called
    after the probes (drop their cached blocks first) and returns the whole device's used memory.
    Returns (patch, predicted peak MB, whether it fits)."""
    forward = ForwardMemory.fit([(probe, forward_mb(probe)) for probe in probe_patches(training, total_stride)])
    used_mb = device_used_mb()

    def peak_mb(patch):
        return (used_mb + UNTRACKED_MB
                + ALLOCATOR_OVERHEAD * (accumulators_mb(volume_shape, patch, num_classes) + forward.predict_mb(patch)))

    return largest_fitting_patch(candidate_patches(enlarged, training, total_stride), peak_mb, budget_mb)


def inference_patch_size(volume: torch.Tensor, model: LoadedModel, settings: PredictionSettings
                         ) -> tuple[tuple[int, ...], float | None]:
    """The training patch enlarged by `patch_scale`; on CUDA the largest of that, the training patch and
    smaller ones whose predicted whole-device peak stays within `gpu_memory_budget_mb` (gpu_memory.py).
    Returns (patch, predicted peak in MB, None where nothing was predicted)."""
    config = model.config
    fixed = fixed_patch(model)
    if fixed is not None:
        return fixed, None
    patch = enlarged_patch_size(config.patch_size, config.total_stride, volume.shape[1:],
                                settings.patch_scale)
    if model.device.type != "cuda" or model.backend != "torch":
        return patch, None
    device, network = model.device, model.networks[0]
    patch, predicted, fits = choose_patch(
        patch, config.patch_size, config.total_stride, volume.shape[1:], config.num_classes,
        settings.gpu_memory_budget_mb, lambda probe: forward_allocation_mb(network, probe, volume.shape[0], device),
        lambda: device_used_mb(device))
    if not fits:
        log.warning("warning: %s: even the %s patch is predicted to need %.0f MB of GPU memory, over the "
                    "%.0f MB budget", config.model_dir, "x".join(map(str, patch)), predicted,
                    settings.gpu_memory_budget_mb)
    return patch, round(predicted)


def smaller_patch(patch: tuple[int, ...], model: LoadedModel) -> tuple[int, ...]:
    """The training patch where `patch` is larger, else half of it (rounded up to the network's stride)."""
    config = model.config
    return tuple(train if size > train else max(stride, math.ceil(train / 2 / stride) * stride)
                 for size, train, stride in zip(patch, config.patch_size, config.total_stride))


def fixed_patch(model: LoadedModel) -> tuple[int, ...] | None:
    """The one patch the model's networks take, where their export fixed it (export_onnx --patch-size), else
    None (any multiple of the stride)."""
    patches = {tuple(getattr(network, "fixed_patch", None) or ()) for network in model.networks}
    if patches == {()}:
        return None
    if len(patches) > 1:
        shown = ", ".join("x".join(map(str, p)) if p else "any" for p in sorted(patches))
        raise ModelError(f"{model.config.model_dir}: the folds' exports take different patches ({shown}); "
                         "export them alike")
    return next(iter(patches))


def check_patch_request(model: LoadedModel, settings: PredictionSettings) -> None:
    """Before any case: the patch asked for (--patch-size) is one the network takes, and an export fixed to one
    patch is run at that patch (said once). ModelError otherwise."""
    config, asked = model.config, settings.patch_size
    stride = config.total_stride
    if asked is not None and any(p <= 0 or p % s for p, s in zip(asked, stride)):
        raise ModelError(f"--patch-size {'x'.join(map(str, asked))}: must be a multiple of the network's total "
                         f"stride {'x'.join(map(str, stride))} ({config.model_dir / 'plans.json'})")
    fixed = fixed_patch(model)
    if fixed is None:
        return
    shown = "x".join(map(str, fixed))
    if asked is not None and tuple(asked) != fixed:
        raise ModelError(f"{getattr(model.networks[0], 'source', config.model_dir)}: exported for the fixed patch "
                         f"{shown}, not the --patch-size {'x'.join(map(str, asked))} asked for; run with "
                         f"--patch-size {' '.join(map(str, fixed))} or export with dynamic axes")
    if asked is None:
        log.info("%s takes only the %s patch it was exported for: windows of %s", model.networks[0].source, shown,
                 shown)
