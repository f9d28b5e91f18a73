"""Drop weak predicted lesions: connected components, at model resolution, that are too small or whose
most confident voxel is not confident enough.

A segmentation network trained on few steps marks many small, low-confidence blobs in normal tissue;
in FLARE's scoring one such blob turns a healthy case from DSC 1 into DSC 0. Thresholds are per model
(a `lesion_filter.json` in the model folder, tuned on validation cases by
`training/tune_lesion_filter.py`), so a model folder without one is left as it predicts.

Components are found on the argmax mask at model resolution, before resampling back: the volume is then
small whatever the input's size, and dropping a component only raises its background logit, so the
resampling and argmax that follow are unchanged everywhere else (26-connected components are at least
one voxel apart, and trilinear interpolation only mixes 26-neighbours).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import torch

from .errors import ModelError
from .postprocess import argmax_lesion_mask

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["FILTER_FILE", "LesionFilter", "filter_lesions", "lesion_components", "read_lesion_filter"]

FILTER_FILE = "lesion_filter.json"


@dataclass(frozen=True)
class LesionFilter:
    """Keep a predicted lesion only if its volume >= min_volume_ml and its peak lesion probability
    (softmax, summed over the lesion labels) >= min_peak_probability. Zeros keep everything."""
    min_volume_ml: float = 0.0
    min_peak_probability: float = 0.0

    def keeps(self, volume_ml, peak_probability):
        """Whether lesions of this volume and peak probability stay (scalars or arrays)."""
        return (volume_ml >= self.min_volume_ml) & (peak_probability >= self.min_peak_probability)

    @property
    def active(self) -> bool:
        return self.min_volume_ml > 0 or self.min_peak_probability > 0

    def with_overrides(self, min_volume_ml: float | None, min_peak_probability: float | None) -> "LesionFilter":
        return LesionFilter(self.min_volume_ml if min_volume_ml is None else min_volume_ml,
                            self.min_peak_probability if min_peak_probability is None else min_peak_probability)


@dataclass
class LesionComponents:
    """Predicted lesions at model resolution. `labels` is the component map (0 = no lesion, i + 1 =
    component i); `volume_ml[i]` and `peak_probability[i]` describe component i."""
    labels: np.ndarray
    volume_ml: np.ndarray
    peak_probability: np.ndarray

    def failing(self, lesion_filter: LesionFilter) -> np.ndarray:
        """Component ids (1-based) the filter drops."""
        return np.flatnonzero(~lesion_filter.keeps(self.volume_ml, self.peak_probability)) + 1


def read_lesion_filter(model_dir: str | Path) -> LesionFilter:
    """The model folder's lesion_filter.json, or a filter that keeps everything if there is none."""
    path = Path(model_dir) / FILTER_FILE
    if not path.exists():
        return LesionFilter()
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object")
        lesion_filter = LesionFilter(float(values.get("min_volume_ml", 0.0)),
                                     float(values.get("min_peak_probability", 0.0)))
    except (ValueError, TypeError) as err:
        raise ModelError(f"{path}: not a valid lesion filter ({err})") from None
    if not 0 <= lesion_filter.min_volume_ml < float("inf") or not 0 <= lesion_filter.min_peak_probability <= 1:
        raise ModelError(f"{path}: min_volume_ml must be >= 0 and min_peak_probability in [0, 1]")
    return lesion_filter


def lesion_components(logits: torch.Tensor, lesion_ids: tuple[int, ...], voxel_ml: float) -> LesionComponents:
    """Components (26-connected) of the argmax lesion mask of [K, z, y, x] logits, with their volume and
    peak lesion probability. Only the lesion voxels' logits leave the device."""
    mask = argmax_lesion_mask(logits, lesion_ids)
    labels, count = cc3d.connected_components(mask.cpu().numpy(), connectivity=26, return_N=True)
    if count == 0:
        return LesionComponents(labels, np.zeros(0), np.zeros(0))
    lesion_logits = logits[:, mask].float()  # [K, n lesion voxels], in cc3d's C order like labels[labels > 0]
    probability = lesion_logits.softmax(0)[list(lesion_ids)].sum(0).cpu().numpy()
    ids = labels[labels > 0].astype(np.int64) - 1
    peak = np.zeros(count)
    np.maximum.at(peak, ids, probability)
    volume = np.bincount(ids, minlength=count) * voxel_ml
    return LesionComponents(labels, volume, peak)


def drop_components(logits: torch.Tensor, labels: np.ndarray, drop_ids: np.ndarray) -> torch.Tensor:
    """Logits with the background (label 0) winning in the given components, in place."""
    if len(drop_ids) == 0:
        return logits
    dropped = torch.from_numpy(np.isin(labels, drop_ids)).to(logits.device)
    logits[0][dropped] = logits[1:, dropped].max(0).values + 1
    return logits


def filter_lesions(logits: torch.Tensor, lesion_ids: tuple[int, ...], voxel_ml: float,
                   lesion_filter: LesionFilter) -> tuple[torch.Tensor, int, int]:
    """Apply `lesion_filter` to model-resolution logits: (logits, components found, components dropped)."""
    components = lesion_components(logits, lesion_ids, voxel_ml)
    drop_ids = components.failing(lesion_filter)
    return drop_components(logits, components.labels, drop_ids), len(components.volume_ml), len(drop_ids)
