"""Sliding-window inference: window positions, Gaussian importance weighting, logits accumulation."""
from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import CaseError

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["gaussian_importance_map", "in_order", "predict_window", "sliding_window_logits", "window_count",
           "windows_over",
           "window_slices", "window_starts"]

PatchPredictor = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger("inference")


def window_starts(size: int, patch: int, step_size: float) -> list[int]:
    """Evenly spread window starts covering [0, size), at most `patch * step_size` apart (nnU-Net's rule)."""
    n_steps = starts_along(size, patch, step_size)
    if n_steps == 1:
        return [0]
    spacing = (size - patch) / (n_steps - 1)
    return [int(round(spacing * i)) for i in range(n_steps)]


# A whole-body CT at nnU-Net's step 0.5 needs hundreds to thousands of windows; a step of 1e-6 would need
# more than could be listed (1.5 GB in 15 s before one ran). Counted, and refused, before any is built.
MAX_WINDOWS = 200_000


def starts_in(size: int, patch: int, step_size: float, region: slice | None = None) -> list[int]:
    """The window starts along an axis (window_starts), only those whose window meets `region` where one is given."""
    starts = window_starts(size, patch, step_size)
    if region is None:
        return starts
    return [start for start in starts if start < region.stop and start + patch > region.start]


def starts_along(size: int, patch: int, step_size: float) -> int:
    """How many windows cover an axis of `size` voxels, at most `patch * step_size` apart (nnU-Net's rule)."""
    return 1 if size <= patch else math.ceil((size - patch) / (patch * step_size)) + 1


def window_count(shape: Sequence[int], patch: Sequence[int], step_size: float,
                 region: tuple[slice, ...] | None = None) -> int:
    """How many windows window_slices would make, without making them."""
    if region is None:
        return math.prod(starts_along(size, p, step_size) for size, p in zip(shape, patch))
    return math.prod(len(starts_in(size, p, step_size, r)) for size, p, r in zip(shape, patch, region))


def windows_over(shape: Sequence[int], patch: Sequence[int], step_size: float,
                 region: tuple[slice, ...] | None = None) -> int:
    """How many windows sliding_window_logits runs over an unpadded model-space volume of `shape` (axes shorter than
    the patch are padded to it, the region moving with them)."""
    padded = tuple(max(size, p) for size, p in zip(shape, patch))
    return window_count(padded, patch, step_size, None if region is None else padded_region(region, shape, patch))


def window_slices(shape: Sequence[int], patch: Sequence[int], step_size: float,
                  region: tuple[slice, ...] | None = None) -> list[tuple[slice, ...]]:
    """Every window of the sliding window over a (padded) volume of `shape`, as tuples of slices, in the same order
    whatever the region: with `region`, only the windows that meet it. CaseError over MAX_WINDOWS."""
    count = window_count(shape, patch, step_size, region)
    if count > MAX_WINDOWS:
        raise CaseError(f"step {step_size:g} of the {'x'.join(map(str, patch))} patch would make {count:,} windows "
                        f"over {'x'.join(map(str, shape))} voxels, over the limit of {MAX_WINDOWS:,}: take a "
                        "larger --step-size")
    starts = [starts_in(s, p, step_size, region[axis] if region else None)
              for axis, (s, p) in enumerate(zip(shape, patch))]
    return [tuple(slice(b, b + p) for b, p in zip(begin, patch)) for begin in itertools.product(*starts)]


def gaussian_importance_map(patch: Sequence[int], sigma_scale: float = 1 / 8,
                            device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Separable Gaussian peaking at voxel size // 2 (nnU-Net's centre, for voxel-identical parity),
    sigma = patch * sigma_scale, max 1, no zeros.

    Windows overlap; weighting by distance to the window centre down-weights the border predictions,
    which see less context. Zeros are replaced by the smallest positive value so that every voxel has a
    non-zero total weight.
    """
    profiles = []
    for size in patch:
        coords = torch.arange(size, dtype=torch.float64) - size // 2
        profiles.append(torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights = (weights / weights.max()).to(dtype)
    smallest_positive = weights[weights > 0].min()
    weights[weights == 0] = smallest_positive
    return weights.to(device)


def padding_before(size: int, patch: int) -> int:
    """Voxels pad_to_patch adds before an axis of `size` (the volume centred in the patch; none where it is longer)."""
    return max(0, patch - size) // 2


def padded_region(region: tuple[slice, ...], shape: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    """`region` of a volume of spatial `shape`, in the coordinates of that volume padded by pad_to_patch."""
    return tuple(slice(r.start + padding_before(s, p), r.stop + padding_before(s, p))
                 for r, s, p in zip(region, shape, patch))


def pad_to_patch(volume: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad (normalised space) axes shorter than the patch, centred; return the slices to undo it."""
    pads, unpad = [], [slice(None)]
    for size, p in zip(volume.shape[1:], patch):
        missing, before = max(0, p - size), padding_before(size, p)
        pads.append((before, missing - before))
        unpad.append(slice(before, before + size))
    if not any(before or after for before, after in pads):
        return volume, tuple(unpad)
    flat = [amount for axis in reversed(pads) for amount in axis]  # F.pad wants last axis first
    return F.pad(volume, flat), tuple(unpad)


def predict_window(networks: Sequence[PatchPredictor], window: torch.Tensor,
                   mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Sum of every network's logits on `window` [1, C, z, y, x], over all flips of `mirror_axes`."""
    flips = [()] + [combo for r in range(1, len(mirror_axes) + 1)
                    for combo in itertools.combinations(mirror_axes, r)]
    total = None
    for network in networks:
        for flip in flips:
            dims = [axis + 2 for axis in flip]
            logits = network(torch.flip(window, dims) if dims else window)
            logits = torch.flip(logits, dims) if dims else logits
            total = logits if total is None else total + logits
    return total


def in_order(function: Callable, items: Iterable, lanes: int = 1) -> Iterator:
    """function(item) for each item, in the items' order; with lanes > 1 that many run at once on threads
    (the function must release the GIL, as ONNX Runtime does), at most 2 x lanes ahead of the consumer.

    Closed early (an error, SIGTERM), the calls not yet started are cancelled and the running ones are not
    waited for: a stop takes effect at once, not after the windows in flight (every fold, every flip)."""
    if lanes <= 1:
        yield from map(function, items)
        return
    pool, pending = ThreadPoolExecutor(lanes, thread_name_prefix="window"), deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * lanes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def accumulator_dtype(device: torch.device, precision: str = "fp16") -> torch.dtype:
    """fp16 on CUDA (half the memory of fp32, as nnU-Net sums), unless the network runs in fp32 there (`precision`:
    what a calibration's fp32 reference, or a record that chose fp32, measured); fp32 elsewhere (a CPU adds fp16
    slowly)."""
    return torch.float16 if device.type == "cuda" and precision == "fp16" else torch.float32


def sliding_window_logits(volume: torch.Tensor, networks: Sequence[PatchPredictor],
                          patch_size: Sequence[int], num_classes: int, step_size: float = 0.5,
                          mirror_axes: Sequence[int] = (), accumulate_on: torch.device | None = None,
                          progress: bool = False, lanes: int = 1, dtype: torch.dtype | None = None,
                          region: tuple[slice, ...] | None = None) -> torch.Tensor:
    """Logits [K, z, y, x] for a normalised volume [C, z, y, x], Gaussian-weighted over windows.

    `region` (slices of the volume): only the windows that meet it are run, on the same grid as the whole volume's,
    so that every voxel inside it gets the sum of exactly the windows, in the same order, that a run over the whole
    volume gives it: the same logits, bit for bit. Outside the region the logits are 0 (no class wins: background).

    Accumulates in `dtype`, by default accumulator_dtype (fp16 on CUDA). A sum that overflows fp16 (a large
    model's logits over many overlapping windows: nnU-Net stops there) is made again in fp32, said in one
    line; logits that are not finite even so (the network's own output) are a CaseError, never a mask.
    `accumulate_on` moves the accumulators elsewhere (the CPU after an out-of-memory). `lanes` windows are
    predicted at once; they are summed in the windows' order whatever the lanes, so the logits are the same bits.
    """
    accumulate_on = accumulate_on or volume.device
    dtype = dtype or accumulator_dtype(accumulate_on)
    logits = weighted_sum(volume, networks, patch_size, num_classes, step_size, mirror_axes, accumulate_on, progress,
                          lanes, dtype, region)
    if dtype != torch.float32 and not bool(torch.isfinite(logits).all()):
        log.warning("warning: the %s sum of the logits overflowed; summed again in float32",
                    str(dtype).removeprefix("torch."))
        del logits
        logits = weighted_sum(volume, networks, patch_size, num_classes, step_size, mirror_axes, accumulate_on,
                              progress, lanes, torch.float32, region)
    if not bool(torch.isfinite(logits).all()):
        raise CaseError("the network's logits are not finite (an overflow inside the network?); no mask is made")
    return logits


def weighted_sum(volume: torch.Tensor, networks: Sequence[PatchPredictor], patch_size: Sequence[int],
                 num_classes: int, step_size: float, mirror_axes: Sequence[int], accumulate_on: torch.device,
                 progress: bool, lanes: int, dtype: torch.dtype,
                 region: tuple[slice, ...] | None = None) -> torch.Tensor:
    """The Gaussian-weighted mean of every window's logits (of the windows meeting `region`, where given, and 0
    outside it), accumulated in `dtype` on `accumulate_on`."""
    padded, unpad = pad_to_patch(volume, patch_size)
    if region is not None:
        region = padded_region(region, volume.shape[1:], patch_size)
    logits_sum = torch.zeros((num_classes, *padded.shape[1:]), dtype=dtype, device=accumulate_on)
    weight_sum = torch.zeros(padded.shape[1:], dtype=dtype, device=accumulate_on)
    gaussian = gaussian_importance_map(patch_size, device=accumulate_on, dtype=dtype)
    windows = window_slices(padded.shape[1:], patch_size, step_size, region)

    def predict(window: tuple[slice, ...]) -> torch.Tensor:
        return predict_window(networks, padded[(slice(None), *window)][None], mirror_axes)[0]

    with closing(in_order(predict, windows, lanes)) as predictions:  # closed here, whatever stops the loop
        for window, logits in tqdm(zip(windows, predictions), total=len(windows), desc="windows", leave=False,
                                   disable=not progress):
            logits_sum[(slice(None), *window)] += logits.to(accumulate_on, dtype) * gaussian
            weight_sum[window] += gaussian
    if region is not None:
        zero_outside(logits_sum, region)
        weight_sum[weight_sum == 0] = 1  # voxels no window reached: 0 / 1
    logits_sum /= weight_sum
    return logits_sum[unpad]


def zero_outside(tensor: torch.Tensor, region: tuple[slice, ...]) -> None:
    """Set every voxel of a [K, z, y, x] tensor outside the spatial `region` to 0, in place."""
    for axis, window in enumerate(region, start=1):
        before = [slice(None)] * tensor.ndim
        after = list(before)
        before[axis], after[axis] = slice(0, window.start), slice(window.stop, None)
        tensor[tuple(before)] = 0
        tensor[tuple(after)] = 0
