"""Resampling on the compute device with torch (trilinear for intensities and logits, nearest for labels).

nnU-Net's default resamples with scikit-image on the CPU (order 3), which takes tens to hundreds of
seconds on large CTs; torch interpolation on the device takes milliseconds (Kirchhoff et al., Mao).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["resample_channels", "shape_at_spacing"]


def shape_at_spacing(shape: tuple[int, ...], spacing: tuple[float, ...],
                     new_spacing: tuple[float, ...]) -> tuple[int, ...]:
    """Voxel count that covers the same extent at `new_spacing` (nnU-Net's rounding)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample_channels(volume: torch.Tensor, shape: tuple[int, ...], mode: str = "trilinear") -> torch.Tensor:
    """Resample a [C, z, y, x] tensor to spatial `shape`; returns the input itself if already there."""
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    interpolation = {"mode": mode} if mode == "nearest" else {"mode": mode, "align_corners": False}
    return F.interpolate(volume[None], size=tuple(shape), **interpolation)[0]
