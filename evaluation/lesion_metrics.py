"""Lesion-wise (instance) detection metrics for binary lesion masks.

Definitions (see docs/metrics.md):
- Lesions are 26-connected components (connected-components-3d) of GT > 0 and of prediction > 0.
- A GT lesion is detected if any of its voxels is predicted (any overlap). A predicted component is a
  true positive if it overlaps any GT voxel, else a false-positive component.
- recall = detected GT lesions / GT lesions; precision = true-positive predicted components /
  predicted components; F1 = 2PR / (P + R).
- Empty cases: no GT lesion and no predicted component -> precision = recall = F1 = 1 (nothing to find,
  nothing wrongly found; mirrors the FLARE both-empty rule). No GT lesion but predictions -> precision
  0, recall NaN (undefined), F1 0. GT lesions but no prediction -> precision NaN (undefined), recall 0,
  F1 0. NaN values are left out of the summary statistics (pandas skips them).
- FP volume (ml): total volume of predicted components touching no GT voxel; FN volume (ml): total
  volume of GT components touching no predicted voxel (the autoPET definitions).
"""

from __future__ import annotations

import cc3d
import numpy as np

LESION_COLUMNS = [
    "gt_lesions", "detected_lesions", "missed_lesions", "pred_components", "fp_components",
    "lesion_precision", "lesion_recall", "lesion_f1", "fp_volume_ml", "fn_volume_ml",
]


def _bounding_box(mask: np.ndarray):
    """Slices of the bounding box of a boolean mask, or None if it is empty."""
    box = []
    for axis in range(mask.ndim):
        profile = mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))
        idx = np.flatnonzero(profile)
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def _components(mask: np.ndarray, connectivity: int):
    labels, count = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    return labels, int(count)


def lesion_metrics(gt: np.ndarray, pred: np.ndarray, spacing_zyx, connectivity: int = 26) -> dict:
    """Lesion-wise counts, precision/recall/F1 and FP/FN volumes (ml) for one case.

    `gt`, `pred`: arrays of the same shape (non-zero = lesion); `spacing_zyx` in mm, same axis order.
    """
    gt = np.asarray(gt) != 0
    pred = np.asarray(pred) != 0
    if gt.shape != pred.shape:
        raise ValueError(f"masks differ in shape: {gt.shape} vs {pred.shape}")
    voxel_ml = float(np.prod(np.asarray(spacing_zyx, np.float64))) / 1000.0

    # Components never cross the bounding box of the union, so labelling the box is enough (and much
    # cheaper than labelling a whole CT).
    box = _bounding_box(gt | pred)
    if box is None:
        n_gt = n_pred = n_detected = n_true_pred = 0
        fp_voxels = fn_voxels = 0
    else:
        gt, pred = gt[box], pred[box]
        gt_labels, n_gt = _components(gt, connectivity)
        pred_labels, n_pred = _components(pred, connectivity)
        # Only foreground voxels are read from here on (a lesion box can be mostly background).
        gt_sizes = np.bincount(gt_labels[gt], minlength=n_gt + 1)
        pred_sizes = np.bincount(pred_labels[pred], minlength=n_pred + 1)
        overlap = gt & pred
        gt_hit = np.zeros(n_gt + 1, bool)
        gt_hit[gt_labels[overlap]] = True  # GT lesions with a predicted voxel
        pred_hit = np.zeros(n_pred + 1, bool)
        pred_hit[pred_labels[overlap]] = True  # predicted components with a GT voxel
        n_detected = int(gt_hit.sum())
        n_true_pred = int(pred_hit.sum())
        fn_voxels = int(gt_sizes[1:][~gt_hit[1:]].sum())
        fp_voxels = int(pred_sizes[1:][~pred_hit[1:]].sum())

    # Undefined, not perfect, where there is nothing to find or nothing found: a lesion-free case's 1.0 would
    # inflate every mean over cases (its false positives are the healthy-scan rows of the summary instead).
    precision = n_true_pred / n_pred if n_pred else float("nan")
    recall = n_detected / n_gt if n_gt else float("nan")
    if n_gt == 0:
        f1 = float("nan")
    elif n_pred == 0 or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)

    return {
        "gt_lesions": n_gt,
        "detected_lesions": n_detected,
        "missed_lesions": n_gt - n_detected,
        "pred_components": n_pred,
        "fp_components": n_pred - n_true_pred,
        "lesion_precision": precision,
        "lesion_recall": recall,
        "lesion_f1": f1,
        "fp_volume_ml": fp_voxels * voxel_ml,
        "fn_volume_ml": fn_voxels * voxel_ml,
    }
