"""What a phantom case is: its tissue classes, lesion types, the FLARE efficiency sizes, and the
Phantom it is returned as."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


GENERATOR_VERSION = 3  # 2: lymph nodes in nodal stations, normal nodes, bowel walls that survive 3 mm; 3: no lesion cut by
# the volume's faces or a circular field of view
FLARE_SLICE_COUNTS = (55, 100, 150, 215, 334, 448, 499, 554)
# slice spacing of each efficiency case: the scan covers a plausible extent, from a 275 mm abdomen
# (55 slices) to ~830 mm from the lung apices to the thighs (554 slices)
FLARE_SLICE_SPACING = {55: 5.0, 100: 5.0, 150: 3.0, 215: 2.5, 334: 2.0, 448: 1.5, 499: 1.5, 554: 1.5}
FLARE_INDEX_BASE = 90000  # RNG index of the efficiency cases, away from the regular case indices
DEFAULT_HEALTHY_FRACTION = 0.2
HEALTHY_INDEX_BASE = 5000  # phantom index of an evaluation set's healthy_0000: apart from the lesion cases' 0, 1, ...
HU_MIN, HU_MAX = -1024, 3071
PADDING_HU = -1024  # outside the circular reconstruction field of view (no noise there)

# tissue classes of the internal map (lesion hosts are sampled from it)
AIR, SUBCUT, MUSCLE, FAT, LUNG, LIVER, SPLEEN, KIDNEY, MARROW, CORTEX, VESSEL, BOWEL, ORGAN, TABLE, \
    AIRWAY, CSF, LESION, NODAL_FAT, NODE = range(19)
TISSUE_NAMES = ("air", "skin_subcutaneous_fat", "muscle", "visceral_fat", "lung", "liver", "spleen",
                "kidney", "bone_marrow", "cortical_bone", "vessel", "bowel", "organ", "table", "airway",
                "csf", "lesion", "nodal_station_fat", "normal_lymph_node")
# NODAL_FAT: fat of a lymph-node station (along the great vessels, the airways, the mesenteric root, the
# iliac and femoral vessels), where nodal lesions are centred; HU of fat. NODE: a normal node (< 10 mm short
# axis, with its fatty hilum), never labelled (an enlarged node drawn over one replaces it).

LESION_TYPES = {
    # host tissue classes (a lesion is clipped to them), where its centre may lie (default: the hosts),
    # diameter range (mm), how often the type is drawn; for clustering types the gap (mm) between an earlier
    # lesion of the type and the next one (surface to surface, both as spheres of their diameters); the
    # smallest diameter a lesion that does not fit is shrunk to (default: half the range's lower end)
    "liver": dict(hosts=(LIVER,), diameter=(5.0, 80.0), weight=0.30),
    "lung": dict(hosts=(LUNG,), diameter=(3.0, 45.0), weight=0.20),
    # nodal disease: short axis of 10 mm or more, often several enlarged nodes of one station together
    "lymph_node": dict(hosts=(FAT, NODAL_FAT, NODE), centres=(NODAL_FAT,), diameter=(10.0, 40.0), weight=0.20,
                       cluster_gap_mm=25.0, smallest_mm=10.0),
    "kidney": dict(hosts=(KIDNEY,), diameter=(10.0, 65.0), weight=0.12),
    "bone": dict(hosts=(MARROW,), diameter=(6.0, 35.0), weight=0.10),
    "spleen": dict(hosts=(SPLEEN,), diameter=(6.0, 45.0), weight=0.08),
}


@dataclass
class Phantom:
    """One generated case: the CT (int16 HU), its lesion label (uint8 0/1) and its manifest entry."""
    image: sitk.Image
    label: sitk.Image
    info: dict
    tissue: np.ndarray | None = field(default=None, repr=False)  # (z, y, x) TISSUE_NAMES classes, on request


class PhantomError(ValueError):
    """Bad generator arguments (the CLI reports them as one line)."""
