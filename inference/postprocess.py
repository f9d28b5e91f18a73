"""From logits to a 0/1 lesion mask, on the device, at the original (cropped) grid.

Argmax on the logits, never softmax: softmax is monotonic, so the argmax is the same and we skip a pass
over the largest tensor of the pipeline.
"""
from __future__ import annotations

import torch

from .resample import resample_channels


# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["PROBABILITY_SCALE", "lesion_label_ids", "lesion_mask_at_shape", "lesion_probability_at_shape"]

PROBABILITY_SCALE = 255  # a saved probability p is stored as round(p * 255) in uint8: within 0.002 of p


def lesion_label_ids(labels: dict[str, int], lesion_labels: tuple[int, ...] | None) -> tuple[int, ...]:
    """Model labels that count as lesion: every non-background label unless the user names some."""
    if lesion_labels is None:
        return tuple(sorted(v for v in labels.values() if v != 0))
    unknown = set(lesion_labels) - set(labels.values())
    if unknown:
        raise ValueError(f"lesion label(s) {sorted(unknown)} not in the model's labels {labels}")
    return tuple(sorted(lesion_labels))


def argmax_lesion_mask(logits: torch.Tensor, lesion_ids: tuple[int, ...]) -> torch.Tensor:
    """[K, z, y, x] logits -> bool mask of voxels whose argmax is a lesion label."""
    if logits.shape[0] == 2 and lesion_ids == (1,):
        return logits[1] > logits[0]  # ties go to background, as torch.argmax picks the first
    winner = logits.argmax(0)
    return torch.isin(winner, torch.tensor(lesion_ids, device=winner.device))


def lesion_mask_at_shape(logits: torch.Tensor, shape: tuple[int, ...], lesion_ids: tuple[int, ...],
                         method: str = "logits") -> torch.Tensor:
    """Bring model-resolution logits back to `shape` and return a uint8 0/1 mask.

    method "logits": interpolate the logits trilinearly, then argmax (nnU-Net's order; smoother edges).
        With two classes only their difference is interpolated: linear interpolation commutes with the
        subtraction, so the sign is the same as for the full tensors and memory is halved.
    method "labels": argmax at model resolution, then nearest-neighbour upsampling (least memory).
    Where these cannot mark a voxel (no lesion at model resolution: the margin is <= 0 everywhere, and a
    weighted mean of values <= 0 with weights >= 0 is <= 0 in floating point too), the zero mask is returned
    without resampling: the same mask, without the largest tensor of the pipeline.
    """
    if method == "labels":
        mask = argmax_lesion_mask(logits, lesion_ids)
        if not mask.any():
            return torch.zeros(shape, dtype=torch.uint8, device=logits.device)
        mask = mask.to(torch.float16 if logits.is_cuda else torch.float32)
        return resample_channels(mask[None], shape, mode="nearest")[0].to(torch.uint8)
    if method != "logits":
        raise ValueError(f"unknown resample-back method '{method}'")
    work_dtype = torch.float16 if logits.is_cuda else torch.float32
    if logits.shape[0] == 2 and lesion_ids == (1,):
        margin = (logits[1].to(work_dtype) - logits[0].to(work_dtype))[None]
        if not (margin > 0).any():
            return torch.zeros(shape, dtype=torch.uint8, device=logits.device)
        return (resample_channels(margin, shape)[0] > 0).to(torch.uint8)
    resampled = resample_channels(logits.to(work_dtype), shape)
    return argmax_lesion_mask(resampled, lesion_ids).to(torch.uint8)


def lesion_probability_at_shape(logits: torch.Tensor, shape: tuple[int, ...], lesion_ids: tuple[int, ...]
                                ) -> torch.Tensor:
    """The lesion probability at `shape`, as uint8 round(p * PROBABILITY_SCALE): the softmax of the (summed) logits
    over the classes, the lesion labels' probabilities added, in model space; then resampled trilinearly (a
    probability interpolated stays within [0, 1]). For ensembling and calibration (--save-probabilities); the mask
    itself never goes through it."""
    if logits.shape[0] == 2 and lesion_ids == (1,):  # softmax of two classes: the sigmoid of their difference
        probability = torch.sigmoid(logits[1].float() - logits[0].float())
    else:  # one class at a time: no second [K, z, y, x] tensor beside the logits
        total = torch.logsumexp(logits.float(), dim=0) if logits.dtype == torch.float32 else \
            torch.logsumexp(logits, dim=0).float()
        probability = sum(torch.exp(logits[i].float() - total) for i in lesion_ids)
    probability = resample_channels(probability[None], shape)[0]
    return (probability.clamp_(0, 1) * PROBABILITY_SCALE).round_().to(torch.uint8)
