"""Body crop: the bounding box of the body, so that the network never runs a window of the air around it.

The box is a HU threshold plus connected components (as Luo et al.), computed on a downsampled copy so it costs
milliseconds on a 512x512x554 scan. The crop is exact (pipeline.py): the whole volume is tiled as without a crop
and only the windows that meet the box's region in model space (model_space_region) are run.
"""
from __future__ import annotations

import math

import cc3d
import numpy as np


def body_bounding_box(image: np.ndarray, spacing: tuple[float, ...], threshold_hu: float = -500.0,
                      margin_mm: float = 10.0, working_spacing_mm: float = 4.0,
                      keep_fraction: float = 0.02) -> tuple[slice, ...]:
    """Bounding box (as slices) of the body in a (z, y, x) CT, plus a safety margin.

    The default threshold (-500 HU) keeps skin, fat and muscle; the lungs lie inside that outline, so
    the box holds them too. Components with at least `keep_fraction` of the largest one's volume are
    kept as well: arms lying beside the trunk are separated from it by air and may hold lesions.
    Returns the full extent if nothing is above the threshold.
    """
    steps = [max(1, int(working_spacing_mm // s)) for s in spacing]
    coarse = image[tuple(slice(None, None, step) for step in steps)] > threshold_hu
    if not coarse.any():
        return tuple(slice(0, n) for n in image.shape)
    labels, n_components = cc3d.connected_components(coarse, connectivity=26, return_N=True)
    counts = np.bincount(labels.ravel())[1:]
    kept = np.flatnonzero(counts >= keep_fraction * counts.max()) + 1
    body = np.isin(labels, kept) if n_components > 1 else labels > 0
    box = []
    for axis, (step, size, voxel_mm) in enumerate(zip(steps, image.shape, spacing)):
        other_axes = tuple(a for a in range(image.ndim) if a != axis)
        occupied = np.flatnonzero(body.any(axis=other_axes))
        margin = int(np.ceil(margin_mm / voxel_mm))
        # coarse voxel k samples fine voxel k*step: the body may begin just after the last empty sample
        start = max(0, (occupied[0] - 1) * step + 1 - margin)
        stop = min(size, (occupied[-1] + 1) * step + margin)
        box.append(slice(int(start), int(stop)))
    return tuple(box)


def no_crop(image: np.ndarray, spacing: tuple[float, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in image.shape)


# Model voxels kept around a box's own: resampling the logits back (trilinear) reads a model voxel's neighbours.
REGION_MARGIN = 2


def model_space_region(box: tuple[slice, ...], input_shape: tuple[int, ...], model_shape: tuple[int, ...],
                       transpose_forward: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The model-space voxels (axes in the model's order) whose logits a mask inside `box` (input space) is
    resampled from: each input voxel centre mapped as resampling maps it (align_corners=False), REGION_MARGIN
    voxels added around. None where the box is the whole volume."""
    if all(s.start == 0 and s.stop == n for s, n in zip(box, input_shape)):
        return None
    region = []
    for axis in transpose_forward:
        window, size = box[axis], input_shape[axis]
        target = model_shape[len(region)]
        scale = target / size
        low = math.floor((window.start + 0.5) * scale - 0.5) - REGION_MARGIN
        high = math.ceil((window.stop - 0.5) * scale - 0.5) + 1 + REGION_MARGIN
        region.append(slice(max(0, low), min(target, high)))
    return tuple(region)
