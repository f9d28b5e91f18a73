"""Intensity normalisation as nnU-Net's plans name it."""
from __future__ import annotations

import torch


def ct_normalize(volume: torch.Tensor, properties: dict) -> torch.Tensor:
    """CTNormalization: clip to the training foreground's 0.5/99.5 percentiles, then z-score, in place."""
    volume.clamp_(properties["percentile_00_5"], properties["percentile_99_5"])
    volume.sub_(properties["mean"]).div_(max(properties["std"], 1e-8))
    return volume


def zscore_normalize(volume: torch.Tensor, properties: dict) -> torch.Tensor:
    """ZScoreNormalization over the whole image (nnU-Net's default for non-CT)."""
    mean, std = volume.mean(), volume.std()
    volume.sub_(mean).div_(torch.clamp(std, min=1e-8))
    return volume


NORMALIZERS = {
    "CTNormalization": ct_normalize,
    "ZScoreNormalization": zscore_normalize,
    "NoNormalization": lambda volume, properties: volume,
}
