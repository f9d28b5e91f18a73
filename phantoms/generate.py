"""A whole case: anatomy, lesions, noise and blur, as arrays and SimpleITK images; the FLARE
efficiency cases."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .case import (
    DEFAULT_HEALTHY_FRACTION, FLARE_INDEX_BASE, FLARE_SLICE_COUNTS, FLARE_SLICE_SPACING, HU_MAX, HU_MIN,
    LESION, PADDING_HU, Phantom, PhantomError)
from .anatomy import Renderer, choose_geometry, in_plane_spacing, make_patient
from .lesions import place_lesions


# ----------------------------------------------------------------------------------------------------
# noise, blur, int16


def _blur_3tap(src, dst, weight, axis):
    """dst = [w, 1-2w, w] filter of a slab along `axis` (1 or 2), edges copied; no temporaries."""
    inner = (slice(None),) * axis + (slice(1, -1),)
    np.add(src[(slice(None),) * axis + (slice(None, -2),)], src[(slice(None),) * axis + (slice(2, None),)],
           out=dst[inner])
    dst[inner] *= np.float32(weight / (1 - 2 * weight))
    dst[inner] += src[inner]
    dst[inner] *= np.float32(1 - 2 * weight)
    for edge in (0, -1):
        index = (slice(None),) * axis + (edge,)
        dst[index] = src[index]


def _finish(seed_sequence, hu, patient, outside_fov, chunk=8):
    """Add noise and blur in-plane, in place on the int16 volume, slab by slab (one RNG per slab).

    The blur is a separable 3-tap kernel k = [w, 1-2w, w] (variance 2w: sigma = blur_px). Gaussian white
    noise of sd `scale` becomes spatially correlated noise of sd scale * sum(k^2) (the 2D kernel is the
    outer product of k with itself), which is the patient's noise_hu.
    """
    weight = min(0.25, patient.blur_px ** 2 / 2)
    kernel_sq = 2 * weight ** 2 + (1 - 2 * weight) ** 2
    scale = patient.noise_hu / kernel_sq
    starts = range(0, hu.shape[0], chunk)
    block = np.empty((min(chunk, hu.shape[0]),) + hu.shape[1:], np.float32)
    noise = np.empty_like(block)
    for start, seed in zip(starts, seed_sequence.spawn(len(starts))):
        n = min(chunk, hu.shape[0] - start)
        b, w = block[:n], noise[:n]
        np.copyto(b, hu[start:start + n])
        np.random.default_rng(seed).standard_normal(out=w, dtype=np.float32)
        w *= np.float32(scale)
        b += w
        if min(hu.shape[1:]) > 2:
            _blur_3tap(b, w, weight, axis=2)
            _blur_3tap(w, b, weight, axis=1)
        if outside_fov is not None:
            b[:, outside_fov] = PADDING_HU
        np.clip(b, HU_MIN, HU_MAX, out=b)
        np.copyto(hu[start:start + n], b, casting="unsafe")  # truncation: within 1 HU


# ----------------------------------------------------------------------------------------------------
# public API


def _case_name(index: int) -> str:
    return f"phantom_{index:04d}"


def _generate_arrays(seed, index, shape_zyx, spacing_zyx, healthy, direction, origin, healthy_fraction, name):
    """The case as arrays (image int16, tissue uint8 with LESION voxels) plus geometry and manifest entry."""
    if shape_zyx is not None and (len(shape_zyx) != 3 or min(int(s) for s in shape_zyx) < 1):
        raise PhantomError(f"shape must be three positive integers (z y x), got {shape_zyx}")
    if spacing_zyx is not None and (len(spacing_zyx) != 3 or min(float(s) for s in spacing_zyx) <= 0):
        raise PhantomError(f"spacing must be three positive numbers (z y x), got {spacing_zyx}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise PhantomError(f"healthy fraction must be within [0, 1], got {healthy_fraction}")
    streams = np.random.SeedSequence([int(seed), int(index)]).spawn(6)
    rng_patient, rng_geometry, rng_anatomy, rng_lesions, rng_healthy = (
        np.random.default_rng(stream) for stream in streams[:5])
    drawn_healthy = bool(rng_healthy.random() < healthy_fraction)
    healthy = drawn_healthy if healthy is None else bool(healthy)
    patient = make_patient(rng_patient)
    shape, spacing, direction, origin, t_first = choose_geometry(rng_geometry, patient, shape_zyx, spacing_zyx,
                                                                  direction, origin)
    renderer = Renderer(rng_anatomy, patient, shape, spacing, direction, origin, t_first)
    hu = np.empty(shape, np.int16)
    tissue = np.empty(shape, np.uint8)
    for k in range(shape[0]):
        renderer.render(k, hu[k], tissue[k])
    lesions = place_lesions(rng_lesions, patient, hu, tissue, spacing, healthy, renderer.outside_fov)
    _finish(streams[5], hu, patient, renderer.outside_fov)
    voxel_ml = float(np.prod(spacing)) / 1000
    t_range = renderer.t[[0, -1]]
    info = dict(case=name or _case_name(index), seed=int(seed), index=int(index), shape_zyx=list(shape),
                spacing_zyx=[float(s) for s in spacing], origin_xyz=list(origin), direction=list(direction),
                healthy=not lesions, lesion_count=len(lesions),
                lesion_volume_ml=round(sum(lesion["voxels"] for lesion in lesions) * voxel_ml, 6),
                lesions=lesions,
                body_range_mm=[round(float(t_range.min()), 1), round(float(t_range.max()), 1)],
                noise_hu=round(patient.noise_hu, 2), circular_fov=patient.circular_fov)
    return hu, tissue, info


def _to_image(array, info):
    image = sitk.GetImageFromArray(array)
    s_z, s_y, s_x = info["spacing_zyx"]
    image.SetSpacing((s_x, s_y, s_z))
    image.SetOrigin(tuple(info["origin_xyz"]))
    image.SetDirection(tuple(info["direction"]))
    return image


def _label_in_place(tissue):
    """The 0/1 lesion label, computed in the tissue array's own memory (saves a large allocation)."""
    label = tissue.view(np.uint8)
    np.equal(tissue, LESION, out=label.view(bool))
    return label


def generate_phantom(seed: int, index: int, shape_zyx=None, spacing_zyx=None, healthy: bool | None = None,
                     direction=None, origin=None, *, healthy_fraction: float = DEFAULT_HEALTHY_FRACTION,
                     name: str | None = None, with_tissue: bool = False) -> Phantom:
    """Case `index` of `seed`: the same whatever other cases are generated.

    shape_zyx / spacing_zyx: (z, y, x); by default 512x512 in-plane with a field of view fitting the
    body and a slice count / spacing of a typical protocol (a given shape keeps its slice count).
    direction: 9 values (SimpleITK order), diagonal +-1 only; origin: (x, y, z) mm. healthy=None draws
    it with `healthy_fraction`. with_tissue keeps the tissue-class map (TISSUE_NAMES) in `.tissue`.
    """
    hu, tissue, info = _generate_arrays(seed, index, shape_zyx, spacing_zyx, healthy, direction, origin,
                                        healthy_fraction, name)
    kept = tissue.copy() if with_tissue else None
    label = _label_in_place(tissue)
    return Phantom(image=_to_image(hu, info), label=_to_image(label, info), info=info, tissue=kept)


def flare_case_specs() -> list[dict]:
    """The eight efficiency cases: name, RNG index, shape 512x512xN and slice spacing."""
    return [dict(name=f"flare_z{n:03d}", index=FLARE_INDEX_BASE + i, shape_zyx=(n, 512, 512),
                 spacing_z=FLARE_SLICE_SPACING[n]) for i, n in enumerate(FLARE_SLICE_COUNTS)]


def generate_flare_case(seed: int, slices: int, healthy_fraction: float = DEFAULT_HEALTHY_FRACTION) -> Phantom:
    """The efficiency case with `slices` slices (one of FLARE_SLICE_COUNTS)."""
    spec = next((s for s in flare_case_specs() if s["shape_zyx"][0] == slices), None)
    if spec is None:
        raise PhantomError(f"no FLARE efficiency case with {slices} slices (choose from {FLARE_SLICE_COUNTS})")
    return generate_phantom(seed, spec["index"], spec["shape_zyx"], _flare_spacing(seed, spec),
                            healthy_fraction=healthy_fraction, name=spec["name"])


def _flare_spacing(seed, spec):
    """In-plane spacing as the default geometry would choose it; the slice spacing of FLARE_SLICE_SPACING."""
    streams = np.random.SeedSequence([int(seed), int(spec["index"])]).spawn(6)
    in_plane = in_plane_spacing(make_patient(np.random.default_rng(streams[0])), 512, 512)
    return (spec["spacing_z"], in_plane, in_plane)
