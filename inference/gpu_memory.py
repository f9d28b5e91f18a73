"""The largest inference patch whose whole-device GPU peak stays under a budget (FLARE: 4 GB, as NVML sees
the whole device: CUDA context, loaded kernels, torch's cached blocks, other processes).

A forward pass needs memory linear in the patch's voxel count (activations, cuDNN workspace) plus a
constant (autocast's fp16 weight copies): on an H200 a 102 M-parameter ResEnc-L took 1378 / 2319 /
3723 MB at 128^3 / 160^3 / 192^3, within 1 MB of a line (results/gpu_forward_memory.md). So two probe
passes at patches smaller than the training patch predict the larger ones without ever running them:
running the enlarged patch just to see whether it fits would itself break the budget.

What torch's allocator does not see grows too: the first window of a new size loads more kernels
(CUDA's lazy module loading, cuDNN engines). On the H200 the whole-device peak came out 538 and 592 MB
above a prediction without that term (results/gpu_patch_selection.md); UNTRACKED_MB covers it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Reserved over allocated peak of one window with expandable segments (set by inference.cli): 1.16-1.26
# on the H200 for the ResEnc-L at 128^3-192^3; the default allocator reached 1.53 at 192^3.
ALLOCATOR_OVERHEAD = 1.3
UNTRACKED_MB = 640.0


def voxels(patch: Sequence[int]) -> int:
    return math.prod(int(p) for p in patch)


@dataclass(frozen=True)
class ForwardMemory:
    """MB a forward pass allocates beyond what is already allocated: intercept + per_voxel * voxels."""
    intercept_mb: float
    per_voxel_mb: float

    @classmethod
    def fit(cls, probes: Sequence[tuple[Sequence[int], float]]) -> "ForwardMemory":
        (patch_a, mb_a), (patch_b, mb_b) = probes
        slope = max(0.0, (mb_b - mb_a) / (voxels(patch_b) - voxels(patch_a)))
        return cls(intercept_mb=max(0.0, mb_a - slope * voxels(patch_a)), per_voxel_mb=slope)

    def predict_mb(self, patch: Sequence[int]) -> float:
        return self.intercept_mb + self.per_voxel_mb * voxels(patch)


def accumulators_mb(volume_shape: Sequence[int], patch: Sequence[int], num_classes: int,
                    value_bytes: int = 2) -> float:
    """Logits and weight sums over the volume padded to the patch, plus the Gaussian map: fp16 (`value_bytes` 2), or
    fp32 (4) where the network runs in fp32."""
    padded = math.prod(max(size, p) for size, p in zip(volume_shape, patch))
    return ((num_classes + 1) * padded + voxels(patch)) * value_bytes / 2 ** 20


def forward_allocation_mb(network: Callable[[torch.Tensor], torch.Tensor], patch: Sequence[int],
                          channels: int, device: torch.device) -> float:
    """Peak MB one forward pass of `patch` allocates beyond what is allocated now (CUDA only)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    network(torch.zeros((1, channels, *patch), device=device, dtype=torch.float16))
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def device_used_mb(device: torch.device) -> float:
    """Used memory of the whole device (total - free), what the FLARE sampler reads from NVML, after
    returning torch's cached blocks."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2 ** 20
