"""Lesions: how many, of which type, where (a voxel of the host tissue), and their shapes and HU."""
from __future__ import annotations

import math

import cc3d
import numpy as np
from scipy import ndimage

from .case import FAT, LESION, LESION_TYPES
from .anatomy import tissue_lut, smooth_noise_3d


# ----------------------------------------------------------------------------------------------------
# lesions


_COUNT_CHOICES = np.array([1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 4, 4, 5, 6, 8])


def _lesion_hu(rng, kind, H):
    if kind == "liver":
        return H["liver"] - rng.uniform(40, 75)  # hypodense metastasis
    if kind == "spleen":
        return H["spleen"] - rng.uniform(45, 70)
    if kind == "lung":
        return rng.uniform(10, 50)  # soft-tissue nodule
    if kind == "lymph_node":
        return rng.uniform(30, 70)  # replaced by tumour: homogeneous soft tissue, no fatty hilum left
    if kind == "kidney":
        return rng.uniform(45, 95)  # enhances less than the cortex
    return rng.uniform(20, 80) if rng.random() < 0.6 else rng.uniform(800, 1150)  # lytic / sclerotic


def _random_rotation(rng):
    """Uniform random rotation matrix from a random unit quaternion."""
    a, b, c, d = rng.standard_normal(4) / 1.0
    norm = math.sqrt(a * a + b * b + c * c + d * d)
    a, b, c, d = a / norm, b / norm, c / norm, d / norm
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


def _cut_off(mask, lo, hi, shape, outside_fov):
    """Whether a lesion's `mask` (the box lo:hi of a volume of `shape`) reaches a face of the volume or the outside of
    a circular field of view: a lesion the scan cuts, whose label would hold voxels the image does not show."""
    for axis in range(3):
        if (lo[axis] == 0 and mask.take(0, axis=axis).any()) or \
                (hi[axis] == shape[axis] and mask.take(-1, axis=axis).any()):
            return True
    return outside_fov is not None and bool((mask & outside_fov[lo[1]:hi[1], lo[2]:hi[2]][None]).any())


def _make_lesion(rng, kind, diameter, centre, hu, tissue, spacing, H, outside_fov=None):
    """Paint one lesion around voxel `centre`, clipped to its host tissue: its voxel count, or 0 (none painted:
    where it would touch another lesion, lose half of itself to the clipping, or be cut by the scan's edge)."""
    radius = diameter / 2
    blobs = [(np.zeros(3), radius * rng.uniform(0.8, 1.2, 3), _random_rotation(rng))]
    for _ in range(int(rng.integers(0, 4)) if diameter > 12 else int(rng.integers(0, 2))):  # lobulation
        direction = rng.standard_normal(3)
        offset = direction / np.linalg.norm(direction) * radius * rng.uniform(0.35, 0.7)
        radii = radius * rng.uniform(0.4, 0.7) * rng.uniform(0.85, 1.15, 3)
        blobs.append((offset, radii, _random_rotation(rng)))
    reach = max(float(np.linalg.norm(o) + r.max()) for o, r, _ in blobs) * 1.2 + 1
    lo = np.maximum(0, np.floor(centre - reach / spacing)).astype(int)
    hi = np.minimum(tissue.shape, np.ceil(centre + reach / spacing) + 1).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    pz, py, px = (((np.arange(a, b) - c) * s).astype(np.float32) for a, b, c, s in zip(lo, hi, centre, spacing))
    pz, py, px = pz[:, None, None], py[None, :, None], px[None, None, :]
    d = None
    for offset, radii, rot in blobs:
        qz, qy, qx = pz - np.float32(offset[0]), py - np.float32(offset[1]), px - np.float32(offset[2])
        blob = None
        for axis in range(3):  # coordinate along each of the blob's axes, in units of its radius
            q = qz * np.float32(rot[0, axis] / radii[axis]) + qy * np.float32(rot[1, axis] / radii[axis]) \
                + qx * np.float32(rot[2, axis] / radii[axis])
            blob = q * q if blob is None else blob + q * q
        d = blob if d is None else np.minimum(d, blob)
    noise = smooth_noise_3d(rng, d.shape, spacing, max(2.0, diameter / 4))
    d += np.float32(0.18) * noise
    centre_in_box = tuple(int(c - a) for c, a in zip(centre, lo))
    sub_tissue = tissue[box]
    if (sub_tissue[d < 1.5] == LESION).any():  # lesions stay apart: one connected component each
        return 0
    region = d < 1
    region[centre_in_box] = True  # a tiny lesion still covers its centre voxel
    host = tissue_lut(*LESION_TYPES[kind]["hosts"])
    if kind == "kidney":  # renal tumours may grow out of the kidney into the fat around it
        host[FAT] = True
    mask = region & host[sub_tissue]
    if not mask[centre_in_box]:
        return 0
    # clipping may cut the blob apart: keep the piece holding the centre, one connected lesion
    pieces = cc3d.connected_components(mask, connectivity=6)
    mask = pieces == pieces[centre_in_box]
    if mask.sum() < 0.5 * region.sum():
        return 0
    if (sub_tissue[ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))] == LESION).any():
        return 0  # it would touch another lesion
    if _cut_off(mask, lo, hi, tissue.shape, outside_fov):
        return 0
    value = np.float32(_lesion_hu(rng, kind, H)) + np.float32(5) * noise
    if diameter > 30 and kind in ("liver", "kidney", "lymph_node") and rng.random() < 0.5:
        value = np.where(d < 0.35, value - np.float32(rng.uniform(15, 30)), value)  # necrotic core
    np.copyto(hu[box], value, where=mask, casting="unsafe")
    np.copyto(sub_tissue, LESION, where=mask, casting="unsafe")
    return int(np.count_nonzero(mask))


def _near_earlier(pool, coarse_shape, coarse_spacing, lesions, kind, steps, diameter):
    """The candidate centres (flat coarse indices of `pool`) that put a lesion of `diameter` within the type's
    cluster gap of an earlier lesion of that type (enlarged nodes come several to a station), surfaces
    measured as spheres of the diameters; all of them if none is that close."""
    gap = LESION_TYPES[kind].get("cluster_gap_mm")
    earlier = [lesion for lesion in lesions if lesion["type"] == kind]
    if gap is None or not earlier:
        return pool
    points = np.stack(np.unravel_index(pool, coarse_shape), axis=1) * coarse_spacing
    near = np.zeros(len(pool), bool)
    for lesion in earlier:
        earlier_mm = np.asarray(lesion["centre_index_zyx"], float) / steps * coarse_spacing
        reach = gap + (lesion["diameter_mm"] + diameter) / 2
        near |= ((points - earlier_mm) ** 2).sum(axis=1) < reach * reach
    return pool[near] if near.any() else pool


def place_lesions(rng, patient, hu, tissue, spacing, healthy, outside_fov=None):
    """Draw the case's lesions; their manifest entries (volumes from the painted voxel counts). Each lies wholly inside
    the volume and the field of view (`outside_fov`: the in-plane mask outside a circular one)."""
    if healthy:
        return []
    spacing = np.asarray(spacing, float)
    steps = np.maximum(1, np.round(4.0 / spacing)).astype(int)  # centre voxels are sampled every ~4 mm
    coarse = tissue[::steps[0], ::steps[1], ::steps[2]]
    coarse_ml = float(np.prod(steps * spacing)) / 1000
    any_centre = tissue_lut(*{c for spec in LESION_TYPES.values() for c in spec.get("centres", spec["hosts"])})
    centre_voxels = np.flatnonzero(any_centre[coarse])
    centre_class = coarse[np.unravel_index(centre_voxels, coarse.shape)]
    candidates = {}
    for kind, spec in LESION_TYPES.items():
        found = centre_voxels[tissue_lut(*spec.get("centres", spec["hosts"]))[centre_class]]
        if found.size * coarse_ml >= (5.0 if kind in ("kidney", "bone", "spleen") else 20.0):
            candidates[kind] = found
    if not candidates:
        return []
    kinds = list(candidates)
    weights = np.array([LESION_TYPES[k]["weight"] for k in kinds])
    weights /= weights.sum()
    count = int(rng.choice(_COUNT_CHOICES))
    first = kinds[rng.choice(len(kinds), p=weights)]
    same_organ = rng.random() < 0.6  # metastases often cluster in one organ
    voxel_ml = float(np.prod(spacing)) / 1000
    lesions = []
    for n in range(count):
        kind = first if n == 0 or same_organ else kinds[rng.choice(len(kinds), p=weights)]
        lo, hi = LESION_TYPES[kind]["diameter"]
        smallest = LESION_TYPES[kind].get("smallest_mm", 0.5 * lo)
        if n == 0:
            lo = max(lo, 10.0)  # most cases hold at least one lesion of 10 mm or more
        diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        pool = _near_earlier(candidates[kind], coarse.shape, steps * spacing, lesions, kind, steps, diameter)
        for attempt in range(25):
            flat = int(pool[rng.integers(pool.size)])
            index = np.array(np.unravel_index(flat, coarse.shape)) * steps
            index = np.minimum(index + rng.integers(0, steps), np.array(tissue.shape) - 1)
            voxels = _make_lesion(rng, kind, diameter, index, hu, tissue, spacing, patient.hu, outside_fov)
            if voxels:
                lesions.append(dict(type=kind, volume_ml=round(voxels * voxel_ml, 6), voxels=voxels,
                                    diameter_mm=round(diameter, 2), centre_index_zyx=[int(i) for i in index]))
                break
            if attempt % 5 == 4:
                diameter = max(smallest, 0.8 * diameter)
    return lesions
