"""The body: random patient parameters, landmarks and outlines along the craniocaudal axis, the scan's
geometry, smooth random fields, and the slice-by-slice renderer of tissues and HU values."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .case import (
    AIR, AIRWAY, BOWEL, CORTEX, CSF, FAT, KIDNEY, LIVER, LUNG, MARROW, MUSCLE, NODAL_FAT, NODE, ORGAN,
    PADDING_HU, PhantomError, SPLEEN, SUBCUT, TABLE, VESSEL)


# ----------------------------------------------------------------------------------------------------
# the patient: random anatomy parameters; landmarks and outline keyframes along t


@dataclass
class Patient:
    width: float       # lateral scale of the lean body
    depth: float       # antero-posterior scale of the lean body
    height: float      # craniocaudal scale of the landmarks
    shift: float       # craniocaudal offset of the landmarks (mm)
    fat: float         # subcutaneous fat thickness over the abdomen (mm)
    hu: dict           # tissue intensities (HU)
    bladder_fill: float
    gallbladder: bool
    noise_hu: float    # noise standard deviation after the blur
    blur_px: float     # in-plane Gaussian blur sigma (voxels)
    circular_fov: bool
    oral_contrast: bool  # positive oral contrast: bowel fluid 150-350 HU instead of 0-20 HU

    @property
    def max_half_width(self) -> float:
        return 175 * self.width + 1.1 * self.fat

    @property
    def max_half_depth(self) -> float:
        return 112 * self.depth + self.fat

    def t(self, t_nominal: float) -> float:
        """This patient's position (mm along t) of a nominal adult landmark."""
        return t_nominal * self.height + self.shift


def make_patient(rng: np.random.Generator) -> Patient:
    contrast = rng.uniform(0.85, 1.15)  # portal-venous phase with varying enhancement
    hu = dict(fat=rng.uniform(-110, -85), skin=rng.uniform(10, 40), muscle=rng.uniform(40, 60),
              lung=rng.uniform(-880, -820), liver=rng.uniform(95, 125) * contrast ** 0.5,
              spleen=rng.uniform(100, 130) * contrast ** 0.5, kidney=rng.uniform(160, 200) * contrast,
              medulla=rng.uniform(110, 140) * contrast, aorta=rng.uniform(170, 230) * contrast,
              vein=rng.uniform(140, 180) * contrast, marrow=rng.uniform(220, 320),
              cortex=rng.uniform(700, 1000), fluid=rng.uniform(0, 20), bowel_wall=rng.uniform(60, 90),
              organ=rng.uniform(40, 60), pancreas=rng.uniform(80, 110), heart=rng.uniform(140, 200),
              myocardium=rng.uniform(70, 100), table=rng.uniform(150, 350), thyroid=rng.uniform(90, 140))
    return Patient(width=rng.uniform(0.88, 1.12), depth=rng.uniform(0.88, 1.12), height=rng.uniform(0.93, 1.07),
                   shift=rng.uniform(-15, 15), fat=float(rng.uniform(6, 42)), hu=hu,
                   bladder_fill=rng.uniform(0.4, 1.2), gallbladder=bool(rng.random() < 0.75),
                   noise_hu=rng.uniform(7, 15), blur_px=rng.uniform(0.5, 0.75),
                   circular_fov=bool(rng.random() < 0.5), oral_contrast=bool(rng.random() < 0.4))


# nominal landmarks (mm along t) of an average adult
LM = dict(apex=125, clavicle=125, arch=165, carina=215, heart=(212, 335), dome_r=292, dome_l=308,
          liver_end=470, spleen=(312, 425), stomach=(298, 430), kidney_l=(392, 512), kidney_r=(408, 528),
          pancreas=(392, 432), gallbladder=(395, 455), bifurcation=555, iliac=(548, 700), s1=578,
          sacrum_end=705, femoral_head=725, pubis=(735, 790), bladder=(680, 785), split=795, lung_base=352)

# lean body outline (half width A, half depth B) and the vertebral body (centre v, radius) along t
_BODY_T = np.array([-60, 80, 112, 150, 200, 300, 380, 460, 540, 600, 680, 760, 800, 1000], float)
_BODY_A = np.array([52, 55, 75, 140, 150, 152, 150, 146, 150, 158, 165, 170, 172, 172], float)
_BODY_B = np.array([56, 58, 66, 96, 108, 112, 110, 104, 100, 99, 98, 96, 95, 95], float)
_SPINE_V = np.array([12, 13, 18, 52, 60, 58, 52, 44, 38, 48, 60, 68, 70, 70], float)
_SPINE_R = np.array([8, 9, 10, 12, 14, 17, 19, 21, 22, 22, 22, 22, 22, 22], float)
# subcutaneous fat as a fraction of its abdominal thickness
_FAT_T = np.array([-60, 100, 160, 300, 420, 600, 760, 1000], float)
_FAT_F = np.array([0.25, 0.3, 0.6, 0.75, 1.0, 1.1, 1.1, 0.8], float)
# body cavity half width as a fraction of the lean half width (0: no cavity)
_CAV_T = np.array([110, 128, 300, 560, 640, 700, 780, 800], float)
_CAV_F = np.array([0.0, 0.86, 0.88, 0.86, 0.66, 0.52, 0.42, 0.0], float)
# vertebra period (body + disc, mm)
_VERT_T = np.array([-60, 120, 300, 578], float)
_VERT_P = np.array([17, 20, 27, 34], float)


class Station(NamedTuple):
    """One lymph-node station's cross-section on a slice: an ellipse in patient mm (u, v), the side it is
    on (0: midline), and whether it takes the groin's subcutaneous fat too."""
    name: str
    side: int
    cu: float
    cv: float
    au: float
    av: float
    groin: bool = False


def _station_ranges(lm):
    """Where along t each lymph-node station lies (mm, this patient's landmarks)."""
    return dict(cervical=(lm["apex"] - 75, lm["apex"] + 5), mediastinal=(lm["apex"] + 15, lm["carina"] + 35),
                hilar=(lm["carina"] - 5, lm["carina"] + 40),
                retroperitoneal=(lm["dome_r"] + 20, lm["bifurcation"]),
                mesenteric=(lm["pancreas"][0] + 5, lm["kidney_l"][1]),
                iliac=(lm["bifurcation"], lm["femoral_head"] + 15),
                inguinal=(lm["femoral_head"] + 15, lm["split"] + 70))


def _taper(t, top, bottom, power=0.5):
    """Ellipsoid-like size factor along t: 0 outside [top, bottom], 1 in the middle."""
    if t <= top or t >= bottom:
        return 0.0
    x = (2 * t - top - bottom) / (bottom - top)
    return (1 - x * x) ** power


def _dome(t, top, full, bottom, tail=0.5):
    """Size factor rising like a dome from `top` to 1 at `full`, then shrinking to 0 at `bottom`."""
    if t <= top or t >= bottom:
        return 0.0
    if t < full:
        x = (full - t) / (full - top)
        return math.sqrt(1 - x * x)
    x = (t - full) / (bottom - full)
    return (1 - x * x) ** tail


# ----------------------------------------------------------------------------------------------------
# geometry


def _check_direction(direction) -> tuple[float, ...]:
    values = tuple(float(d) for d in np.asarray(direction, dtype=float).ravel())
    if len(values) != 9 or not np.array_equal(np.abs(np.asarray(values).reshape(3, 3)), np.eye(3)):
        raise PhantomError(f"direction must be a diagonal matrix of +-1 (9 values), got {direction}")
    return values


def _scan_range(rng: np.random.Generator) -> tuple[float, float]:
    """Craniocaudal range (t, mm) of a typical FLARE-like protocol."""
    kinds = [((-20, 10), (820, 900), 0.15),   # whole body
             ((95, 130), (760, 800), 0.30),   # chest-abdomen-pelvis
             ((265, 300), (760, 800), 0.25),  # abdomen-pelvis
             ((265, 300), (540, 600), 0.15),  # abdomen
             ((90, 120), (400, 450), 0.10),   # chest with the upper abdomen
             ((-15, 20), (540, 600), 0.05)]   # neck-chest-abdomen
    weights = np.array([k[2] for k in kinds])
    start, stop, _ = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    return float(rng.uniform(*start)), float(rng.uniform(*stop))


def in_plane_spacing(patient: Patient, n_y: int, n_x: int) -> float:
    """A field of view fitting the widest part of the body, as a technician would choose it."""
    fov = max(2 * patient.max_half_width + 55, 2 * patient.max_half_depth + 80)
    spacing = fov / max(n_x, n_y)
    if n_x == 512 and n_y == 512:  # the range of real scans
        spacing = float(np.clip(spacing, 0.6, 1.0))
    return round(spacing, 4)


def choose_geometry(rng, patient, shape_zyx, spacing_zyx, direction, origin):
    """Shape, spacing, direction, origin and the t of the first slice. Given values are kept."""
    n_z = None
    n_y = n_x = 512
    if shape_zyx is not None:
        n_z, n_y, n_x = (int(s) for s in shape_zyx)
    t_first, t_last = _scan_range(rng)
    if spacing_zyx is not None:
        s_z, s_y, s_x = (float(s) for s in spacing_zyx)
    else:
        s_y = s_x = in_plane_spacing(patient, n_y, n_x)
        if n_z is not None:
            s_z = round(float(np.clip((t_last - t_first) / n_z, 0.6, 5.0)), 4)
        else:
            s_z = float(rng.choice([0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0],
                                   p=[.05, .1, .15, .15, .15, .1, .1, .1, .1]))
            s_z = max(s_z, round((t_last - t_first) / 700, 4))  # default cases stay <= ~700 slices
    if n_z is None:
        n_z = max(1, int(round((t_last - t_first) / s_z)))
    extent = n_z * s_z
    if abs(extent - (t_last - t_first)) > s_z:  # a fixed slice count: centre the range on the trunk
        centre = -30 + extent / 2 if extent >= 950 else \
            float(np.clip(rng.normal(440, 140), -30 + extent / 2, 920 - extent / 2))
        t_first = centre - extent / 2
    if direction is None:
        direction = [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                     (1, 0, 0, 0, 1, 0, 0, 0, -1)][rng.choice(3, p=[0.7, 0.15, 0.15])]
    direction = _check_direction(direction)
    # the physical box of the voxel centres: near the scanner's isocentre, anywhere along the table
    sizes_xyz = np.array([(n_x - 1) * s_x, (n_y - 1) * s_y, (n_z - 1) * s_z])
    centre_xyz = np.array([rng.uniform(-20, 20), rng.uniform(-40, 60), rng.uniform(-1400, 200)])
    low_xyz = centre_xyz - sizes_xyz / 2
    flipped = np.diag(np.asarray(direction).reshape(3, 3)) < 0
    if origin is None:
        origin = np.where(flipped, low_xyz + sizes_xyz, low_xyz)
    origin = tuple(float(round(o, 3)) for o in origin)
    return (n_z, n_y, n_x), (s_z, s_y, s_x), direction, origin, t_first


def _axis_coordinates(shape, spacing, direction, origin):
    """Physical LPS coordinate (mm) of the voxel centres along x (columns), y (rows) and z (slices)."""
    flips = np.diag(np.asarray(direction).reshape(3, 3))
    n_z, n_y, n_x = shape
    s_z, s_y, s_x = spacing
    return (origin[0] + flips[0] * s_x * np.arange(n_x), origin[1] + flips[1] * s_y * np.arange(n_y),
            origin[2] + flips[2] * s_z * np.arange(n_z))


# ----------------------------------------------------------------------------------------------------
# smooth random fields (organ outlines, lung and liver vessels, bowel content, lesion shapes)


# patient-coordinate box (mm) holding the random nodes: the same nodes for every geometry of a case
FIELD_BOX_TVU = ((-150.0, 1150.0), (-320.0, 320.0), (-360.0, 360.0))


def _gaussian_weights(coords, nodes, step):
    """Weights of random nodes at `nodes` for points at `coords`: unit L2 norm (unit-variance field);
    all zero (a zero field) for points farther than ~3 steps from every node."""
    w = np.exp(-0.5 * ((np.asarray(coords, float)[:, None] - nodes[None, :]) / step) ** 2)
    w[w < 1e-3] = 0
    w /= np.maximum(np.sqrt((w ** 2).sum(axis=1, keepdims=True)), 1e-12)
    return w.astype(np.float32)


def _used_nodes(weights):
    """The contiguous range of nodes with a non-zero weight, and the weights restricted to it."""
    used = np.flatnonzero(weights.any(axis=0))
    span = slice(int(used[0]), int(used[-1]) + 1) if used.size else slice(0, 1)
    return weights[:, span], span


def _node_grid(coords, step):
    return np.arange(float(coords.min()) - 3 * step, float(coords.max()) + 4 * step, step)


class _SmoothFields:
    """Unit-variance smooth random fields over patient coordinates (t, v, u), evaluated slice by slice.

    Random nodes every `step_mm` over FIELD_BOX_TVU (so every geometry of a case sees the same field)
    are blended with Gaussian weights (einsum: deterministic, no BLAS threads) onto a grid of half
    that spacing anchored at multiples of it, then bilinearly interpolated to the voxel centres.
    """

    def __init__(self, rng, u, v, t, step_mm, count):
        nodes_t, nodes_v, nodes_u = (np.arange(lo, hi + step_mm / 2, step_mm) for lo, hi in FIELD_BOX_TVU)
        self.nodes = rng.standard_normal((count, len(nodes_t), len(nodes_v), len(nodes_u)), dtype=np.float32)
        fine = step_mm / 2
        self.grid_u = self._grid(u, fine)
        self.grid_v = self._grid(v, fine)
        self.w_u, self.span_u = _used_nodes(_gaussian_weights(self.grid_u, nodes_u, step_mm))
        self.w_v, self.span_v = _used_nodes(_gaussian_weights(self.grid_v, nodes_v, step_mm))
        self.w_t = _gaussian_weights(t, nodes_t, step_mm)
        # bilinear interpolation from the half-step grid to the voxel centres
        self.i_u, self.f_u = self._linear(u, self.grid_u)
        self.i_v, self.f_v = self._linear(v, self.grid_v)
        self._planes: dict = {}

    @staticmethod
    def _grid(coords, fine):
        first, last = math.floor(float(coords.min()) / fine) - 1, math.ceil(float(coords.max()) / fine) + 2
        return fine * np.arange(first, last)

    @staticmethod
    def _linear(coords, grid):
        position = (np.asarray(coords, float) - grid[0]) / (grid[1] - grid[0])
        index = np.clip(np.floor(position).astype(np.intp), 0, len(grid) - 2)
        return index, np.clip(position - index, 0, 1).astype(np.float32)

    def plane(self, k, which):
        key = (k, which)
        plane = self._planes.get(key)
        if plane is None:
            if len(self._planes) > 8:
                self._planes.clear()
            w = self.w_t[k]
            used = np.flatnonzero(w)
            nodes = self.nodes[which, used][:, self.span_v, self.span_u]
            coeff = np.einsum("j,jab->ab", w[used], nodes)
            plane = np.einsum("ib,jb->ij", np.einsum("ia,ab->ib", self.w_v, coeff), self.w_u)
            self._planes[key] = plane
        return plane

    def block(self, k, which, rows, cols):
        plane = self.plane(k, which)
        i_v, f_v = self.i_v[rows], self.f_v[rows]
        top = plane[i_v]
        lines = top + (plane[i_v + 1] - top) * f_v[:, None]
        i_u, f_u = self.i_u[cols], self.f_u[cols]
        left = lines[:, i_u]
        return left + (lines[:, i_u + 1] - left) * f_u[None, :]


def smooth_noise_3d(rng, shape, spacing, step_mm):
    """Unit-variance smooth noise on a small box (Gaussian blending of random nodes, einsum)."""
    weights = []
    for n, s in zip(shape, spacing):
        coords = np.arange(n) * s
        weights.append(_gaussian_weights(coords, _node_grid(coords, step_mm), step_mm))
    nodes = rng.standard_normal(tuple(w.shape[1] for w in weights)).astype(np.float32)
    out = np.einsum("ck,ijk->ijc", weights[2], nodes)
    out = np.einsum("bj,ijc->ibc", weights[1], out)
    return np.einsum("ai,ibc->abc", weights[0], out)


# ----------------------------------------------------------------------------------------------------
# painting one slice


def tissue_lut(*classes):
    lut = np.zeros(256, bool)
    lut[list(classes)] = True
    return lut


INSIDE_CAVITY = tissue_lut(FAT, LUNG, LIVER, SPLEEN, KIDNEY, VESSEL, BOWEL, ORGAN, AIRWAY)
ONLY_LUNG, ONLY_LIVER, ONLY_KIDNEY, ONLY_ORGAN, ONLY_BOWEL, ONLY_MUSCLE = (
    tissue_lut(c) for c in (LUNG, LIVER, KIDNEY, ORGAN, BOWEL, MUSCLE))
LUNG_OR_FAT = tissue_lut(LUNG, FAT)
CHEST_WALL = tissue_lut(MUSCLE, SUBCUT, FAT)
CAVITY_OR_MUSCLE = INSIDE_CAVITY | tissue_lut(MUSCLE)
WALL_MUSCLE = tissue_lut(MUSCLE, SUBCUT)
ONLY_FAT, ONLY_NODAL_FAT = tissue_lut(FAT), tissue_lut(NODAL_FAT)
GROIN_FAT = tissue_lut(FAT, SUBCUT)  # inguinal nodes lie in the subcutaneous fat of the groin


class _Slice:
    """Bounding-box-limited painting of ellipses, rings and capsules on one axial slice.

    A region is (rows, cols, d) with d < 1 inside the shape (for ellipses d is the squared normalised
    radius, so d < (1 - x)^2 is the same ellipse shrunk by the fraction x); `paint` writes HU and the
    tissue class there.
    """

    def __init__(self, renderer, k, hu, tissue):
        self.r = renderer
        self.k = k
        self.hu = hu
        self.tissue = tissue
        self.u = renderer.u
        self.v = renderer.v
        self._wobble_box = None
        self._wobble = None

    @staticmethod
    def _range(coords, lo, hi):
        step = float(coords[1] - coords[0]) if len(coords) > 1 else 1.0
        a, b = (lo - float(coords[0])) / step, (hi - float(coords[0])) / step
        if a > b:
            a, b = b, a
        i0, i1 = max(0, math.ceil(a)), min(len(coords), math.floor(b) + 1)
        return slice(i0, i1) if i1 > i0 else None

    def box(self, u_lo, u_hi, v_lo, v_hi):
        cols = self._range(self.u, u_lo, u_hi)
        rows = self._range(self.v, v_lo, v_hi)
        return (rows, cols) if rows is not None and cols is not None else None

    def wobble_field(self, rows, cols):
        """Outline wobble: computed once on the first (largest, the body's) box and sliced after."""
        cached = self._wobble_box
        if cached is not None and cached[0].start <= rows.start and rows.stop <= cached[0].stop \
                and cached[1].start <= cols.start and cols.stop <= cached[1].stop:
            return self._wobble[rows.start - cached[0].start:rows.stop - cached[0].start,
                                cols.start - cached[1].start:cols.stop - cached[1].start]
        field_block = self.r.fields.block(self.k, 0, rows, cols)
        if cached is None:
            self._wobble_box, self._wobble = (rows, cols), field_block
        return field_block

    def ellipse(self, cu, cv, au, av, angle=0.0, wobble=0.0, box=None):
        if au <= 0 or av <= 0:
            return None
        if box is None:
            grow = 1 + 1.5 * wobble
            ru, rv = (max(au, av) * grow,) * 2 if angle else (au * grow, av * grow)
            box = self.box(cu - ru, cu + ru, cv - rv, cv + rv)
            if box is None:
                return None
        rows, cols = box
        du = self.u[cols] - np.float32(cu)
        dv = self.v[rows] - np.float32(cv)
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            p = du[None, :] * np.float32(c / au) + dv[:, None] * np.float32(s / au)
            q = dv[:, None] * np.float32(c / av) - du[None, :] * np.float32(s / av)
            d = p * p + q * q
        else:
            d = (dv * np.float32(1 / av))[:, None] ** 2 + (du * np.float32(1 / au))[None, :] ** 2
        if wobble:
            d += np.float32(wobble) * self.wobble_field(rows, cols)
        return rows, cols, d

    def again(self, region, cu, cv, au, av, angle=0.0, wobble=0.0):
        """d of another ellipse on `region`'s box (off-centre rings, cut-outs); inf if it vanishes."""
        if au <= 0 or av <= 0:
            return np.full(region[2].shape, np.inf, np.float32)
        return self.ellipse(cu, cv, au, av, angle, wobble, box=(region[0], region[1]))[2]

    def capsule(self, a, b, radius, box=None):
        """d < 1 within `radius` of the segment a-b (points as (u, v))."""
        if radius <= 0:
            return None
        (au, av), (bu, bv) = a, b
        if box is None:
            box = self.box(min(au, bu) - radius, max(au, bu) + radius,
                           min(av, bv) - radius, max(av, bv) + radius)
            if box is None:
                return None
        rows, cols = box
        eu, ev = bu - au, bv - av
        length2 = eu * eu + ev * ev or 1e-6
        pu = (self.u[cols] - np.float32(au))[None, :]
        pv = (self.v[rows] - np.float32(av))[:, None]
        tau = np.clip(pu * np.float32(eu / length2) + pv * np.float32(ev / length2), 0, 1)
        d = (pu - tau * np.float32(eu)) ** 2 + (pv - tau * np.float32(ev)) ** 2
        d *= np.float32(1 / (radius * radius))
        return rows, cols, d

    def relabel(self, region, tissue, only):
        """Change the tissue class (not the HU) to `tissue` where d < 1 and the class is in `only`."""
        if region is not None:
            rows, cols, d = region
            np.copyto(self.tissue[rows, cols], tissue, where=(d < 1) & only[self.tissue[rows, cols]],
                      casting="unsafe")

    def paint(self, region, value, tissue, mask=None, only=None, limit=1.0):
        """Set HU `value` (scalar or block) and the tissue class where d < limit (and mask, only)."""
        if region is None:
            return None
        rows, cols, d = region
        inside = d < limit
        if mask is not None:
            inside &= mask
        if only is not None:
            inside &= only[self.tissue[rows, cols]]
        np.copyto(self.hu[rows, cols], value, where=inside, casting="unsafe")
        if tissue is not None:
            np.copyto(self.tissue[rows, cols], tissue, where=inside, casting="unsafe")
        return inside

    def bone_ellipse(self, cu, cv, au, av, cortex_mm, angle=0.0, wobble=0.0, only=None):
        """Cortical shell of about `cortex_mm` around cancellous marrow."""
        region = self.ellipse(cu, cv, au, av, angle, wobble)
        if region is None:
            return None
        H = self.r.p.hu
        inside = self.paint(region, H["cortex"], CORTEX, only=only)
        shrink = 1 - cortex_mm / min(au, av)
        if shrink > 0:
            self.paint(region, H["marrow"], MARROW, mask=inside, limit=shrink * shrink)
        return inside

    def bone_capsule(self, a, b, radius, cortex_mm):
        region = self.capsule(a, b, radius)
        if region is None:
            return None
        H = self.r.p.hu
        inside = self.paint(region, H["cortex"], CORTEX)
        if radius > cortex_mm:
            self.paint(region, H["marrow"], MARROW, mask=inside, limit=(1 - cortex_mm / radius) ** 2)
        return inside


class Renderer:
    """One case's anatomy: per-slice keyframed profiles and the slice painter."""

    def __init__(self, rng, patient, shape, spacing, direction, origin, t_first):
        self.p = patient
        self.shape = shape
        self.spacing = spacing
        x, y, z = _axis_coordinates(shape, spacing, direction, origin)
        # patient coordinates: u towards the patient's left (+x in LPS), v towards the back (+y)
        free = max(0.0, abs(y[-1] - y[0]) / 2 - patient.max_half_depth - 40)
        offset_x, offset_y = rng.uniform(-15, 15), rng.uniform(-0.4, 0.3)  # drawn whatever the geometry
        body_x = float(x.mean() + offset_x)
        body_y = float(y.mean() - 15 + offset_y * free)
        self.u = (x - body_x).astype(np.float32)
        self.v = (y - body_y).astype(np.float32)
        self.t = t_first + (float(z.max()) - z)  # t grows towards the feet
        self.fields = _SmoothFields(rng, self.u, self.v, self.t, step_mm=22.0, count=2)
        self.vessel_fields = _SmoothFields(rng, self.u, self.v, self.t, step_mm=9.0, count=2)
        self.rib_phase = rng.uniform(0, 2 * np.pi)
        self.lm = {key: (tuple(patient.t(x) for x in val) if isinstance(val, tuple) else patient.t(val))
                   for key, val in LM.items()}
        self._profiles()
        self._make_bowel(rng)
        self._make_template(rng)
        self.station_t_ranges = _station_ranges(self.lm)
        self._make_normal_nodes(rng)

    def _profiles(self):
        p = self.p
        tn = (self.t - p.shift) / p.height  # nominal t of each slice
        self.A = np.interp(tn, _BODY_T, _BODY_A) * p.width
        self.B = np.interp(tn, _BODY_T, _BODY_B) * p.depth
        self.v_s = np.interp(tn, _BODY_T, _SPINE_V) * p.depth
        self.r_vb = np.interp(tn, _BODY_T, _SPINE_R) * (0.5 + 0.5 * p.width)
        self.fat = np.interp(tn, _FAT_T, _FAT_F) * p.fat
        self.cav = np.interp(tn, _CAV_T, _CAV_F)
        grid = np.arange(-60, 1000, 1.0)
        level = np.cumsum(1.0 / np.interp(grid, _VERT_T, _VERT_P))
        self.vert_level = np.interp(tn, grid, level)

    def _make_bowel(self, rng):
        """Small-bowel loops: short tubes (ellipsoids, elongated in-plane or along t)."""
        lm = self.lm
        self.loops = [dict(t=rng.uniform(lm["kidney_l"][0] + 35, lm["bladder"][0] + 15), h=rng.uniform(12, 40),
                           fu=rng.uniform(-0.5, 0.5), fv=rng.uniform(-0.75, 0.15), a=rng.uniform(9, 14),
                           stretch=rng.uniform(1, 2.2), angle=rng.uniform(0, np.pi),
                           content=str(rng.choice(["fluid", "fluid", "fluid", "gas", "level"])),
                           fluid=self._bowel_fluid_hu(rng.uniform(0, 1)))
                      for _ in range(int(rng.integers(40, 60)))]

    def _bowel_fluid_hu(self, quantile):
        """Water-like fluid (0-20 HU, below any node), or positive oral contrast (150-350 HU), at `quantile`
        (in [0, 1)) of the range."""
        return 150 + 200 * quantile if self.p.oral_contrast else 20 * quantile

    def _make_normal_nodes(self, rng):
        """Normal lymph nodes, as on any CT: 4-9 mm short axis, oval, each with a fatty hilum, scattered
        through the nodal stations. They are not lesions; nodes replaced by tumour are (lesions.py)."""
        self.normal_node_hu = rng.uniform(35, 60)
        names = list(self.station_t_ranges)
        self.normal_nodes = []
        for _ in range(int(rng.integers(14, 28))):
            name = names[int(rng.integers(len(names)))]
            lo, hi = self.station_t_ranges[name]
            radius = rng.uniform(2.0, 4.5)
            self.normal_nodes.append(dict(
                station=name, side=int(rng.choice([-1, 1])), t=rng.uniform(lo, hi), fu=rng.uniform(-0.7, 0.7),
                fv=rng.uniform(-0.7, 0.7), radius=radius, elongation=rng.uniform(1.2, 1.9),
                half_length=radius * rng.uniform(1.0, 2.2), angle=rng.uniform(0, np.pi)))

    def _make_template(self, rng):
        """Air, the scanner table (the same on every slice) and the circular reconstruction field."""
        n_y, n_x = self.shape[1:]
        hu = np.full((n_y, n_x), -1000, np.int16)
        tissue = np.zeros((n_y, n_x), np.uint8)
        u, v = self.u[None, :], self.v[:, None]
        back = float(np.max(0.93 * (self.B + self.fat)))
        top = back + rng.uniform(4, 12)  # a foam pad (about air) lies between the back and the table
        shell_top = top - 30 * (u / 210.0) ** 2  # carbon shell curving up at the edges
        shell = (v >= shell_top) & (v <= shell_top + 4) & (np.abs(u) < 230)
        lower = (v >= top + 60) & (v <= top + 67) & (np.abs(u) < 190)
        foam = (v > shell_top + 4) & (v < top + 60) & (np.abs(u) < 185)
        hu[foam] = -950
        hu[shell | lower] = self.p.hu["table"]
        tissue[shell | lower | foam] = TABLE
        self.outside_fov = None
        if self.p.circular_fov:
            rows = (np.arange(n_y) - (n_y - 1) / 2) / (n_y / 2)
            cols = (np.arange(n_x) - (n_x - 1) / 2) / (n_x / 2)
            self.outside_fov = rows[:, None] ** 2 + cols[None, :] ** 2 > 1.0
            hu[self.outside_fov] = PADDING_HU
            tissue[self.outside_fov] = AIR
        self.hu_template, self.tissue_template = hu, tissue
        # angle around the chest from the spine (0) to the sternum (pi), both sides alike: ribs
        self.chest_angle = np.arccos(np.clip(v / np.sqrt(u * u + v * v + 1e-6), -1, 1)).astype(np.float32)

    # --- one slice ---------------------------------------------------------------------------------
    def render(self, k, hu, tissue):
        np.copyto(hu, self.hu_template)
        np.copyto(tissue, self.tissue_template)
        t = float(self.t[k])
        s = _Slice(self, k, hu, tissue)
        if t > self.lm["split"]:
            self._thighs(s, t, float(self.A[k]), float(self.B[k]), float(self.fat[k]))
        else:
            self._trunk(s, k, t)

    def _trunk(self, s, k, t):
        lm, H = self.lm, self.p.hu
        A, B, fat = float(self.A[k]), float(self.B[k]), float(self.fat[k])
        v_s, r_vb, cav = float(self.v_s[k]), float(self.r_vb[k]), float(self.cav[k])
        # --- skin, subcutaneous fat, muscle wall; lying supine on the table, the back is flat ---------------
        Ao, Bo = A + fat, B + fat
        outer = s.ellipse(0, 0, Ao, Bo, wobble=0.025)
        if outer is None:
            return
        v_rows = self.v[outer[0]][:, None]
        s.paint(outer, H["skin"], SUBCUT, mask=v_rows < 0.93 * Bo)
        s.paint(outer, H["fat"], SUBCUT, mask=v_rows < 0.93 * Bo - 2.5, limit=(1 - 2.5 / Bo) ** 2)
        s.paint(outer, H["muscle"], MUSCLE, mask=v_rows < 0.93 * Bo - 2.5 - 0.4 * fat, limit=(B / Bo) ** 2)
        # --- the body cavity (visceral fat), bounded behind by the spine --------------------------------
        thorax = lm["apex"] - 10 < t < lm["lung_base"] + 10
        Ac = A * cav
        v_ant = -B + (16 if t < lm["dome_r"] else 11)
        if thorax and t < lm["dome_r"] + 30:
            v_post = v_s + r_vb + 6
        elif t < lm["s1"]:
            v_post = v_s + 0.3 * r_vb
        else:
            v_post = v_s - 0.8 * r_vb
        v_c, Bc = (v_ant + v_post) / 2, (v_post - v_ant) / 2
        if cav > 0.05:
            s.paint(s.ellipse(0, v_c, Ac, Bc, wobble=0.02), H["fat"], FAT, only=ONLY_MUSCLE)
        if t < lm["apex"] + 10:
            self._neck(s, t, v_s, r_vb)
        if cav > 0.05 and thorax:
            self._thorax(s, k, t, Ac, Bc, v_c, v_s, r_vb)
        if cav > 0.05 and t > lm["dome_r"] - 5:
            self._abdomen(s, k, t, Ac, Bc, v_c, v_s, r_vb)
        self._great_vessels(s, t, v_s, r_vb, v_c, Bc)
        if t > lm["iliac"][0] - 5:
            self._pelvis(s, k, t, A, B, v_s, r_vb)
        self._spine(s, k, t, v_s, r_vb, Bo)
        if cav > 0.05 and lm["clavicle"] - 12 < t < lm["iliac"][0] - 100:
            self._ribs(s, t, A, B, Ac, Bc, v_c)
        self._paint_stations(s, t, self._trunk_stations(k, t))

    # --- lymph-node stations ----------------------------------------------------------------------------
    def _within(self, name, t):
        lo, hi = self.station_t_ranges[name]
        return lo <= t <= hi

    def _trunk_stations(self, k, t):
        """The nodal stations crossing this slice: fat along the vessels and airways that nodes lie beside
        (no arms here, so no axillary station)."""
        lm, within = self.lm, (lambda name: self._within(name, t))
        A, B, fat = float(self.A[k]), float(self.B[k]), float(self.fat[k])
        v_pre = float(self.v_s[k] - self.r_vb[k])  # the front of the vertebral body
        stations = []
        for side in (-1, 1):
            if within("cervical"):  # jugular chain, in the carotid sheath fat
                stations.append(Station("cervical", side, side * 31, v_pre - 12, 19, 16))
            if within("hilar"):
                stations.append(Station("hilar", side, side * 0.3 * A * float(self.cav[k]), v_pre - 14, 20, 18))
            if within("iliac"):  # along the common, then external iliac vessels
                x = min(1.0, (t - lm["bifurcation"]) / (lm["femoral_head"] - lm["bifurcation"]))
                cu, cv = side * (10 + (0.45 * A - 10) * x), (v_pre - 12) * (1 - x) + (-0.45 * B) * x
                stations.append(Station("iliac", side, cu - side * 5, cv + 3, 22, 18))
            if within("inguinal") and t < lm["split"]:  # the groin's fat, in front of the muscle wall
                front = -B * math.sqrt(1 - 0.45 ** 2)  # the muscle's front edge at u = 0.45 A
                stations.append(Station("inguinal", side, side * 0.45 * A, front - 0.4 * fat, 24,
                                        0.4 * fat + 6, groin=True))
        if within("mediastinal"):  # paratracheal, aortopulmonary window, subcarinal
            stations.append(Station("mediastinal", 0, -4, v_pre - 32, 34, 28))
        if within("retroperitoneal"):  # retrocrural, para-aortic and aortocaval, around the aorta and the IVC
            x = min(1.0, max(0.0, (t - lm["dome_r"]) / 60))
            cu_aorta = 26 - 18 * x
            cv_aorta = (float(self.v_s[k]) - 0.55 * float(self.r_vb[k])) * (1 - x) + (v_pre - 12) * x
            stations.append(Station("retroperitoneal", 0, (cu_aorta - 20) / 2, (cv_aorta + v_pre - 10) / 2,
                                    abs(cu_aorta + 20) / 2 + 20, 22))
        if within("mesenteric"):  # the root of the mesentery, around the superior mesenteric vessels
            stations.append(Station("mesenteric", 0, 0, self._mesenteric_v(t, v_pre), 24, 18))
        return stations

    def _mesenteric_v(self, t, v_pre):
        """v of the superior mesenteric vessels: from the pancreas forwards into the mesentery."""
        return v_pre - 32 - min(40.0, 0.45 * max(0.0, t - self.lm["pancreas"][0]))

    def _paint_stations(self, s, t, stations):
        """Station fat (tissue class only; nodal lesions are centred there), then the normal nodes in it."""
        for station in stations:
            s.relabel(s.ellipse(station.cu, station.cv, station.au, station.av, wobble=0.05), NODAL_FAT,
                      GROIN_FAT if station.groin else ONLY_FAT)
        for node in self.normal_nodes:
            dt = t - node["t"]
            if abs(dt) >= node["half_length"]:
                continue
            station = next((st for st in stations if st.name == node["station"] and st.side in (0, node["side"])),
                           None)
            if station is None:
                continue
            f = math.sqrt(1 - (dt / node["half_length"]) ** 2)
            cu, cv = station.cu + node["fu"] * station.au, station.cv + node["fv"] * station.av
            a_long, a_short, angle = node["radius"] * node["elongation"] * f, node["radius"] * f, node["angle"]
            region = s.ellipse(cu, cv, a_long, a_short, angle=angle)
            inside = s.paint(region, self.normal_node_hu, NODE, only=ONLY_NODAL_FAT)
            if inside is not None and inside.any():  # the fatty hilum, off-centre along the long axis
                shift = 0.4 * a_long
                hilum = s.again(region, cu + shift * math.cos(angle), cv + shift * math.sin(angle),
                                0.5 * a_long, 0.5 * a_short, angle)
                s.paint((region[0], region[1], hilum), self.p.hu["fat"], NODE, mask=inside)

    def _neck(self, s, t, v_s, r_vb):
        lm, H = self.lm, self.p.hu
        v_tr = v_s - r_vb - 24
        for side in (-1, 1):  # carotid sheath fat around the jugular vein and the carotid artery
            s.paint(s.ellipse(side * 30, v_tr + 12, 17, 15, wobble=0.05), H["fat"], FAT, only=ONLY_MUSCLE)
        f = _taper(t, lm["apex"] - 65, lm["apex"] - 15)
        if f:
            for side in (-1, 1):
                s.paint(s.ellipse(side * 17, v_tr + 2, 9 * f, 14 * f, angle=side * 0.3), H["thyroid"], ORGAN)
        s.paint(s.ellipse(4, v_s - r_vb - 7, 7, 5), H["organ"], ORGAN)  # oesophagus
        trachea = s.ellipse(0, v_tr, 9.5, 8.5)
        s.paint(trachea, 60, ORGAN)
        s.paint(trachea, -1000, AIRWAY, limit=0.72)

    def _great_vessels(self, s, t, v_s, r_vb, v_c, Bc):
        """Neck vessels joining the aortic arch and the brachiocephalic veins; the aorta down to the pelvis."""
        lm, H = self.lm, self.p.hu
        arch = lm["arch"]
        if t < arch - 5:
            # carotid arteries and jugular veins, converging on the arch and the brachiocephalic veins
            x = min(1.0, max(0.0, (t - lm["apex"] + 20) / (arch - lm["apex"] + 15)))
            v_tr = v_s - r_vb - 24 + 4 * x
            for side in (-1, 1):
                s.paint(s.ellipse(side * (34 - 6 * x), v_tr + 8 - 24 * x, 6.5 + 2 * x, 5.5 + 2 * x), H["vein"],
                        VESSEL)
                s.paint(s.ellipse(side * (24 - 8 * x) + 4 * x, v_tr + 14 - 22 * x, 4.2 + 2 * x, 4.2 + 2 * x),
                        H["aorta"], VESSEL)
        if abs(t - arch) < 13:  # the arch: a horizontal tube from the ascending to the descending aorta
            s.paint(s.capsule((2, v_c - 0.22 * Bc), (26, v_s - 0.55 * r_vb), math.sqrt(169 - (t - arch) ** 2)),
                    H["aorta"], VESSEL)
        if arch < t < lm["bifurcation"]:
            x = min(1.0, max(0.0, (t - lm["dome_r"]) / 60))  # through the hiatus, in front of the spine
            radius = 12.5 - 2.5 * min(1.0, max(0.0, (t - lm["dome_r"]) / (lm["bifurcation"] - lm["dome_r"])))
            cv = (v_s - 0.55 * r_vb) * (1 - x) + (v_s - r_vb - 12) * x
            s.paint(s.ellipse(26 - 18 * x, cv, radius, radius), H["aorta"], VESSEL)

    def _thorax(self, s, k, t, Ac, Bc, v_c, v_s, r_vb):
        lm, H = self.lm, self.p.hu
        apex, base = lm["apex"], lm["lung_base"]
        for side, shrink in ((-1, 1.0), (1, 0.96)):  # lungs; their last bits are the posterior recesses
            f = _dome(t, apex, apex + 70, base + (5 if side > 0 else 0), tail=0.35)
            if f > 0:
                s.paint(s.ellipse(side * 0.5 * Ac, v_c + (1 - f) * 0.55 * Bc, 0.46 * Ac * f * shrink,
                                  0.94 * Bc * f, wobble=0.04), H["lung"], LUNG, only=INSIDE_CAVITY)
        med = _dome(t, apex - 5, apex + 40, base, tail=0.8)  # mediastinum
        s.paint(s.ellipse(0, v_c + 0.05 * Bc, 0.12 * Ac + 12, 0.95 * Bc * med, wobble=0.03), H["fat"], FAT,
                only=ONLY_LUNG)
        heart_top, heart_bottom = lm["heart"]
        f = _dome(t, heart_top, heart_top + 45, heart_bottom + 5, tail=0.6)
        if f:
            cu, cv, au, av, ang = 0.12 * Ac, v_c - 0.22 * Bc, 0.42 * Ac * f + 6, 0.4 * Bc * f + 4, -0.55
            s.paint(s.ellipse(cu, cv, au + 5, av + 5, angle=ang), H["fat"], FAT, only=INSIDE_CAVITY)
            s.paint(s.ellipse(cu, cv, au, av, angle=ang, wobble=0.02), H["myocardium"], ORGAN)
            chambers = s.ellipse(cu - 3, cv - 2, au - 11, av - 9, angle=ang, wobble=0.02)
            if chambers is not None:
                rows, cols, _ = chambers
                du = (self.u[cols] - np.float32(cu))[None, :]
                dv = (self.v[rows] - np.float32(cv))[:, None]
                septum = np.abs(du * math.cos(ang + 1.1) + dv * math.sin(ang + 1.1)) < 4.5
                s.paint(chambers, H["heart"], ORGAN, mask=~septum)
        # great vessels (the aorta is painted with the trunk) and airways
        v_tr = v_s - r_vb - 20
        arch = lm["arch"]
        v_asc = v_c - 0.22 * Bc
        if arch < t < heart_top + 55:
            s.paint(s.ellipse(2, v_asc, 15, 15), H["aorta"], VESSEL)  # ascending aorta
        if arch - 25 < t < heart_top + 30:
            s.paint(s.ellipse(-26, v_asc + 2, 10 * _taper(t, arch - 60, heart_top + 30, 0.2), 9), H["vein"],
                    VESSEL)  # superior vena cava
        carina = lm["carina"]
        if carina - 10 < t < heart_top + 25:  # pulmonary trunk, then the arteries running to the hila
            s.paint(s.ellipse(20, v_asc - 8, 14, 13), H["aorta"] * 0.9, VESSEL)
        if abs(t - carina - 2) < 9:
            r = math.sqrt(81 - (t - carina - 2) ** 2)
            s.paint(s.capsule((20, v_asc - 6), (0.4 * Ac, v_tr + 8), r), H["aorta"] * 0.9, VESSEL)
            s.paint(s.capsule((12, v_asc - 6), (-0.4 * Ac, v_tr + 8), r), H["aorta"] * 0.9, VESSEL)
        if t < lm["dome_l"] + 20:  # oesophagus, right of the descending aorta, then forwards to the stomach
            x = min(1.0, max(0.0, (t - lm["dome_r"] + 40) / 50))
            s.paint(s.ellipse(-2 + 0.3 * Ac * x, v_s - r_vb - 9 - 25 * x, 7, 5.5), H["organ"], ORGAN)
        if t < lm["carina"]:
            trachea = s.ellipse(0, v_tr, 10, 9)
            s.paint(trachea, 60, ORGAN)
            s.paint(trachea, -1000, AIRWAY, limit=0.72)
        elif t < lm["carina"] + 30:
            spread = (t - lm["carina"]) * 1.1 + 6
            for side in (-1, 1):
                bronchus = s.ellipse(side * spread, v_tr + 3, 7.5, 7)
                s.paint(bronchus, 60, ORGAN)
                s.paint(bronchus, -1000, AIRWAY, limit=0.62)
        # lung vessels: tubes where two smooth fields are both near zero, thicker near the hila
        box = s.box(-Ac, Ac, v_c - Bc, v_c + Bc)
        if box is not None:
            rows, cols = box
            in_lung = s.tissue[rows, cols] == LUNG
            if in_lung.any():
                g1 = self.vessel_fields.block(k, 0, rows, cols)
                g2 = self.vessel_fields.block(k, 1, rows, cols)
                near_v = np.exp(-((self.v[rows] - np.float32(v_tr)) / np.float32(45)) ** 2)
                near_u = np.exp(-((np.abs(self.u[cols]) - np.float32(0.3 * Ac)) / np.float32(40)) ** 2)
                hilum = near_v[:, None] * near_u[None, :]
                vessel = in_lung & (g1 * g1 + g2 * g2 < 0.03 + 0.2 * hilum)
                np.copyto(s.hu[rows, cols], H["vein"] * 0.5, where=vessel, casting="unsafe")

    def _abdomen(self, s, k, t, Ac, Bc, v_c, v_s, r_vb):
        lm, H, p = self.lm, self.p.hu, self.p
        # --- bowel: small-bowel loops and the colon ------------------------------------------------------
        for loop in self.loops:
            f = _taper(t, loop["t"] - loop["h"], loop["t"] + loop["h"])
            if f > 0.3:
                self._bowel_segment(s, loop["fu"] * Ac, v_c + loop["fv"] * Bc, loop["a"] * loop["stretch"] * f,
                                    loop["a"] * f, loop["angle"], loop["content"], loop["fluid"])
        f = _taper(t, lm["kidney_r"][0] + 25, lm["iliac"][0] + 60, power=0.15)
        if f > 0.3:  # ascending colon
            self._bowel_segment(s, -0.7 * Ac, v_c + 0.05 * Bc, 20 * f, 18 * f, 0.0, "faeces", 10)
        f = _taper(t, lm["spleen"][0] + 30, lm["iliac"][0] + 70, power=0.15)
        if f > 0.3:  # descending colon
            self._bowel_segment(s, 0.74 * Ac, v_c + 0.2 * Bc, 16 * f, 15 * f, 0.0, "faeces", 10)
        tc = lm["kidney_l"][0] + 35
        if abs(t - tc) < 16:  # transverse colon, running across the front
            r = 16 * math.sqrt(1 - ((t - tc) / 16) ** 2)
            colon = s.capsule((-0.45 * Ac, v_c - 0.6 * Bc), (0.45 * Ac, v_c - 0.6 * Bc), r)
            wall = s.paint(colon, H["bowel_wall"], BOWEL, only=INSIDE_CAVITY)
            if wall is not None and r > 4.5:
                s.paint(colon, self._faeces(s, colon[0], colon[1]), BOWEL, mask=wall, limit=(1 - 3.5 / r) ** 2)
        # --- stomach -----------------------------------------------------------------------------------
        f = _dome(t, lm["stomach"][0], lm["stomach"][0] + 35, lm["stomach"][1])
        if f:
            self._bowel_segment(s, 0.33 * Ac, v_c - 0.3 * Bc, 0.32 * Ac * f, 0.36 * Bc * f, 0.5, "stomach",
                                # the patient's fluid HU (0-20) as the quantile: the same draw as without contrast
                                self._bowel_fluid_hu(H["fluid"] / 20) + 15, wall=4.5)
        # --- liver, with the diaphragm over its dome ------------------------------------------------------
        f = _dome(t, lm["dome_r"], lm["dome_r"] + 55, lm["liver_end"], tail=0.7)
        if f:
            low = max(0.0, (t - lm["dome_r"] - 90) / (lm["liver_end"] - lm["dome_r"] - 90))
            cu, cv = -0.42 * Ac - 0.12 * Ac * low, v_c + 0.1 * Bc * low
            au, av = 0.5 * Ac * f, 0.82 * Bc * f
            s.paint(s.ellipse(cu, cv, au, av, wobble=0.04), H["liver"], LIVER, only=INSIDE_CAVITY)
            s.paint(s.ellipse(cu, cv, au + 4, av + 4, wobble=0.04), H["muscle"], MUSCLE, only=LUNG_OR_FAT)
            fl = _dome(t, lm["dome_r"] + 8, lm["dome_r"] + 40, lm["dome_r"] + 115)
            if fl:  # left lobe, reaching across the midline in front of the stomach
                lobe = s.ellipse(0.05 * Ac, v_c - 0.52 * Bc, 0.42 * Ac * fl + 4, 0.3 * Bc * fl + 4, angle=0.25,
                                 wobble=0.04)
                shrink = 1 - 4 / (0.3 * Bc * fl + 4)
                s.paint(lobe, H["liver"], LIVER, only=INSIDE_CAVITY, limit=shrink * shrink)
                s.paint(lobe, H["muscle"], MUSCLE, only=LUNG_OR_FAT)  # the diaphragm over it
            box = s.box(cu - au - 0.45 * Ac, cu + au + 0.3 * Ac, v_c - Bc, v_c + Bc)
            if box is not None:  # hepatic and portal veins
                rows, cols = box
                in_liver = s.tissue[rows, cols] == LIVER
                g1 = self.vessel_fields.block(k, 0, rows, cols)
                g2 = self.vessel_fields.block(k, 1, rows, cols)
                np.copyto(s.hu[rows, cols], H["vein"] + 10, where=in_liver & (g1 * g1 + g2 * g2 < 0.08),
                          casting="unsafe")
            fg = _taper(t, *lm["gallbladder"]) if p.gallbladder else 0
            if fg:
                s.paint(s.ellipse(-0.2 * Ac, v_c - 0.38 * Bc, 15 * fg, 21 * fg, angle=0.6), H["fluid"], ORGAN,
                        only=ONLY_LIVER)
        # --- spleen, pancreas ------------------------------------------------------------------------
        f = _taper(t, *lm["spleen"], power=0.6)
        if f:
            s.paint(s.ellipse(0.6 * Ac, v_c + 0.45 * Bc, 0.3 * Ac * f, 0.48 * Bc * f, angle=-0.8, wobble=0.04),
                    H["spleen"], SPLEEN, only=INSIDE_CAVITY)
        f = _taper(t, *lm["pancreas"])
        if f:
            s.paint(s.ellipse(0.08 * Ac, v_s - r_vb - 30, 0.4 * Ac * f, 11 * f, angle=-0.3, wobble=0.06),
                    H["pancreas"], ORGAN, only=INSIDE_CAVITY)
        # --- kidneys: cortex, medulla, and the sinus opening to the antero-medial hilum ------------------
        for side, (top, bottom) in ((1, lm["kidney_l"]), (-1, lm["kidney_r"])):
            f = _taper(t, top, bottom, power=0.6)
            if f <= 0:
                continue
            cu, cv, ang = side * (r_vb + 0.2 * Ac + 26), v_s + 2, side * 0.55
            s.paint(s.ellipse(cu, cv, 30 * f + 8, 27 * f + 8, angle=ang, wobble=0.03), H["fat"], FAT,
                    only=CAVITY_OR_MUSCLE)
            kidney = s.ellipse(cu, cv, 30 * f, 27 * f, angle=ang, wobble=0.02)
            s.paint(kidney, H["kidney"], KIDNEY, only=INSIDE_CAVITY)
            if kidney is not None and f > 0.5:
                s.paint(kidney, H["medulla"], KIDNEY, only=ONLY_KIDNEY, limit=(1 - 8 / (27 * f)) ** 2)
                sinus = s.again(kidney, cu - side * 17 * f, cv - 5 * f, 14 * f, 7 * f, ang)
                s.paint((kidney[0], kidney[1], sinus), H["fluid"] + 5, ORGAN, only=ONLY_KIDNEY)
        # --- aorta, inferior vena cava, portal vein, psoas muscles ------------------------------------------
        v_pre = v_s - r_vb
        if t < lm["bifurcation"]:  # inferior vena cava
            s.paint(s.ellipse(-20, v_pre - 10, 12, 9, wobble=0.03), H["vein"], VESSEL)
        if lm["pancreas"][0] < t < lm["pancreas"][1] - 10:
            s.paint(s.capsule((-22, v_pre - 28), (-0.2 * Ac, v_pre - 45), 7), H["vein"], VESSEL)
        if lm["pancreas"][0] < t < self.station_t_ranges["mesenteric"][1]:  # superior mesenteric artery and vein
            v_sm = self._mesenteric_v(t, v_pre)
            s.paint(s.ellipse(5, v_sm + 2, 3.5, 3.5), H["aorta"], VESSEL, only=ONLY_FAT)
            s.paint(s.ellipse(-7, v_sm, 5, 4.5), H["vein"], VESSEL, only=ONLY_FAT)
        f = _taper(t, lm["kidney_l"][0] + 40, lm["femoral_head"] + 40, power=0.6)
        if f:
            grow = min(1.0, (t - lm["kidney_l"][0] - 40) / 120)
            pelvic = max(0.0, (t - lm["s1"]) / 120)
            for side in (-1, 1):
                cu, cv = side * (r_vb + 6 + 12 * grow + 0.3 * Ac * pelvic), v_s - 0.1 * r_vb - 35 * pelvic
                psoas = s.ellipse(cu, cv, 8 + 14 * grow, 8 + 10 * grow, wobble=0.03)
                s.paint(psoas, H["muscle"], MUSCLE, only=INSIDE_CAVITY)

    def _faeces(self, s, rows, cols):
        texture = self.vessel_fields.block(s.k, 0, rows, cols)
        return np.where(texture > 0.8, np.int16(-950), np.where(texture > -0.2, np.int16(-60), np.int16(25)))

    def _bowel_segment(self, s, cu, cv, au, av, angle, content, fluid_hu, wall=3.5):
        region = s.ellipse(cu, cv, au, av, angle=angle, wobble=0.02)
        inside = s.paint(region, self.p.hu["bowel_wall"], BOWEL, only=INSIDE_CAVITY)
        if inside is None or min(au, av) <= wall + 1:
            return
        rows, cols = region[0], region[1]
        if content == "fluid":
            value = fluid_hu
        elif content == "gas":
            value = -1000
        elif content == "faeces":
            value = self._faeces(s, rows, cols)
        else:  # gas rises to the front (smaller v): an air-fluid level
            level = cv - (0.35 if content == "stomach" else 0.2) * min(au, av)
            value = np.where((self.v[rows] < level)[:, None], np.int16(-1000), np.int16(fluid_hu))
        shrink = 1 - wall / min(au, av)
        s.paint(region, value, BOWEL, mask=inside, limit=shrink * shrink)

    def _pelvis(self, s, k, t, A, B, v_s, r_vb):
        lm, H = self.lm, self.p.hu
        top, bottom = lm["iliac"]
        head_t = lm["femoral_head"]
        # iliac wings: curved plates from the sacroiliac joints out to the front, thickening downwards
        f = _taper(t, top, bottom, power=0.4)
        if f:
            depth = (t - top) / (bottom - top)
            for side in (-1, 1):
                cu, cv = side * (0.44 - 0.1 * depth) * A, v_s - 30 - 10 * depth
                au, av = (0.44 - 0.14 * depth) * A, 0.55 * B
                th = 4 + 9 * depth
                region = s.ellipse(cu, cv, au, av, wobble=0.02)
                if region is None:
                    continue
                rows, cols, _ = region
                du = side * (self.u[cols] - np.float32(cu))
                keep = (self.v[rows] > cv - 0.25 * av)[:, None] | (du > 0.4 * au)[None, :]
                keep &= (self.v[rows] < v_s + 15)[:, None] & (du > -0.35 * au)[None, :]  # up to the SI joints
                hollow = s.again(region, cu - side * 2, cv + 4, au - th, av - th, wobble=0.02)
                inside = s.paint(region, H["cortex"], CORTEX, mask=keep & (hollow >= 1))
                s.paint(region, H["marrow"], MARROW, mask=inside & (hollow >= (1 + 2.5 / (av - th)) ** 2),
                        limit=(1 - 2.5 / av) ** 2)
        # sacrum
        f = _taper(t, lm["s1"] - 4, lm["sacrum_end"], power=0.5)
        if f:
            depth = (t - lm["s1"]) / (lm["sacrum_end"] - lm["s1"])
            w, cv = 52 * f * (1 - 0.5 * depth), v_s + 4 + 22 * depth * depth
            s.bone_ellipse(0, cv, w, 11 * f + 3, 2.5, wobble=0.02)
            s.paint(s.ellipse(0, cv + 4 * f, 9 * f, 3.5 * f), 20, CSF)
        # acetabula, femoral heads, necks and trochanters
        for side in (-1, 1):
            cu, cv = side * 0.5 * A, -0.08 * B
            fa = _taper(t, head_t - 38, head_t + 20)
            if fa:
                s.bone_ellipse(cu - side * 4, cv, 36 * fa, 34 * fa, 3)
            fh = _taper(t, head_t - 27, head_t + 27)
            if fh:
                s.paint(s.ellipse(cu, cv, 25 * fh + 2, 25 * fh + 2), 30, ORGAN)  # joint space
                s.bone_ellipse(cu, cv, 25 * fh, 25 * fh, 2.0)
            if head_t + 5 < t < head_t + 40:
                s.bone_capsule((cu, cv), (side * 0.72 * A, cv + 8), 14, 2.5)
            ft = _taper(t, head_t + 10, lm["split"] + 15)
            if ft:
                s.bone_ellipse(side * 0.72 * A, cv + 10, 24 * ft + 8, 20 * ft + 8, 3)
        # pubic rami and symphysis, ischia
        if lm["pubis"][0] < t < lm["pubis"][1]:
            for side in (-1, 1):
                s.bone_capsule((side * 0.42 * A, -0.22 * B), (side * 10, -0.62 * B), 8, 2.0)
                s.bone_ellipse(side * 0.38 * A, 0.28 * B, 14, 22, 2.5)
        # bladder, rectum, pelvic vessels
        f = _taper(t, *lm["bladder"], power=0.6) * self.p.bladder_fill
        if f > 0.05:
            bladder = s.ellipse(0, -0.35 * B, 55 * f + 3, 45 * f + 3, wobble=0.03)
            inside = s.paint(bladder, 40, ORGAN, only=INSIDE_CAVITY)
            s.paint(bladder, H["fluid"], ORGAN, mask=inside, limit=(1 - 3 / (45 * f + 3)) ** 2)
        f = _taper(t, lm["s1"] + 50, lm["split"] + 5, power=0.2)
        if f > 0.3:  # rectum
            self._bowel_segment(s, 5, v_s - 0.8 * r_vb - 25, 19 * f, 17 * f, 0.0, "faeces", 10)
        bif = lm["bifurcation"]
        if bif < t < lm["split"]:
            x = min(1.0, (t - bif) / (lm["femoral_head"] - bif))
            for side in (-1, 1):
                cu = side * (10 + (0.45 * A - 10) * x)
                cv = (v_s - r_vb - 12) * (1 - x) + (-0.45 * B) * x
                s.paint(s.ellipse(cu, cv, 7, 7), H["aorta"], VESSEL)
                s.paint(s.ellipse(cu - side * 10, cv + 6, 9, 8), H["vein"], VESSEL)

    def _spine(self, s, k, t, v_s, r_vb, back):
        lm, H = self.lm, self.p.hu
        if t > lm["s1"]:
            return
        disc = (float(self.vert_level[k]) % 1.0) > 0.8
        if disc:
            s.paint(s.ellipse(0, v_s, r_vb * 1.08, r_vb), 85, ORGAN)
        else:
            s.bone_ellipse(0, v_s, r_vb * 1.08, r_vb, 2.0)
        # canal, laminae, spinous and transverse processes
        r_c = 0.45 * r_vb + 3
        v_c = v_s + r_vb + r_c + 1
        s.bone_ellipse(0, v_c, r_c + 4, r_c + 4, 4.2)
        s.paint(s.ellipse(0, v_c, r_c, r_c), 20, CSF)
        if not disc:
            tip = min(45.0, 0.88 * back - v_c - r_c - 6)
            if tip > 5:
                s.paint(s.ellipse(0, v_c + r_c + tip / 2 + 2, 4.5, tip / 2), H["cortex"] * 0.8, CORTEX)
            span = 16 if t < lm["apex"] else (22 if t < lm["dome_r"] + 40 else 30)
            for side in (-1, 1):
                s.paint(s.ellipse(side * (r_c + span / 2), v_c - 2, span / 2 + 3, 5.5), H["cortex"] * 0.8,
                        CORTEX)

    def _ribs(self, s, t, A, B, Ac, Bc, v_c):
        lm, H = self.lm, self.p.hu
        # ribs: a band just outside the cavity, where a wave running round the chest is high; its phase
        # grows with the angle from the spine because ribs slope down towards the front
        band = s.ellipse(0, v_c, Ac + 9, Bc + 9)
        if band is not None:
            rows, cols, d = band
            ring = (d < 1) & (s.again(band, 0, v_c, Ac + 3, Bc + 3) >= 1) & CHEST_WALL[s.tissue[rows, cols]]
            angle = self.chest_angle[rows, cols]
            phase = np.float32(2 * np.pi * (t - lm["apex"]) / 26.0 + self.rib_phase)
            wave = np.cos(phase + np.float32(8.0) * angle)
            rib = ring & (wave > 0.5) & (angle < 2.6)  # costal cartilage and sternum at the front
            np.copyto(s.hu[rows, cols], H["cortex"] * 0.7, where=rib, casting="unsafe")
            np.copyto(s.tissue[rows, cols], CORTEX, where=rib, casting="unsafe")
        if lm["clavicle"] < t < lm["heart"][1] + 5:  # sternum
            s.bone_ellipse(0, -B + 10, 24 if t < lm["arch"] + 10 else 14, 7, 2.0)
        if abs(t - lm["clavicle"]) < 10:
            for side in (-1, 1):
                s.bone_capsule((side * 25, -B + 15), (side * 0.85 * A, -0.2 * B), 7, 2.0)
        if lm["apex"] < t < lm["carina"] + 50:  # scapulae
            for side in (-1, 1):
                s.paint(s.ellipse(side * 0.55 * A, 0.62 * B, 45, 4.5, angle=side * 0.45), H["cortex"] * 0.8,
                        CORTEX, only=WALL_MUSCLE)

    def _thighs(self, s, t, A, B, fat):
        H = self.p.hu
        x = min(1.0, (t - self.lm["split"]) / 120)
        stations = []
        for side in (-1, 1):
            cu, cv = side * (0.5 * A + 8 * x), 0.05 * B
            au, av = 0.5 * A - 22 * x, 0.85 * B - 12 * x
            ao, bo = au + 0.8 * fat, av + 0.8 * fat
            outer = s.ellipse(cu, cv, ao, bo, wobble=0.03)
            if outer is None:
                continue
            s.paint(outer, H["skin"], SUBCUT)
            s.paint(outer, H["fat"], SUBCUT, limit=(1 - 2.5 / bo) ** 2)
            s.paint(outer, H["muscle"], MUSCLE, limit=(av / bo) ** 2)
            s.paint(s.ellipse(cu - side * 0.2 * au, cv - 0.3 * av, 12, 9), H["fat"], FAT, only=ONLY_MUSCLE)
            fu = cu + side * 0.12 * au
            shaft = s.ellipse(fu, cv, 15, 15)
            s.paint(shaft, H["cortex"] * 1.2, CORTEX)
            s.paint(shaft, -40, CORTEX, limit=(8 / 15) ** 2)  # fatty marrow of the shaft
            s.paint(s.ellipse(cu - side * 0.35 * au, cv - 0.55 * av, 5, 5), H["aorta"], VESSEL)
            s.paint(s.ellipse(cu - side * 0.33 * au, cv - 0.55 * av + 9, 6.5, 6), H["vein"], VESSEL)
            if self._within("inguinal", t):  # in the subcutaneous fat over the femoral vessels
                stations.append(Station("inguinal", side, cu - side * 0.33 * au, cv - av - 0.4 * fat, 22,
                                        0.4 * fat + 6, groin=True))
        self._paint_stations(s, t, stations)
