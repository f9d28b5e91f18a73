"""Synthetic whole-body CT phantoms with lesion ground truth, written in the FLARE layout.

    python -m phantoms --out DIR --cases N --seed S [--flare-sizes] [--healthy-fraction F]
                                  [--shape Z Y X] [--spacing Z Y X]

writes `DIR/images/<case>_0000.nii.gz` (int16 HU), `DIR/labels/<case>.nii.gz` (uint8 0/1, the image's
geometry) and `DIR/manifest.json`. `--flare-sizes` adds the eight efficiency cases every FLARE paper
reports, 512x512x{55,100,150,215,334,448,499,554} (`flare_z055`, ...).

How a phantom is made
- Anatomy lives in patient millimetres: u (towards the patient's left), v (towards the back) and t
  (craniocaudal, 0 near the top of the neck, ~800 at the hips). Every structure is a cross-section (an
  ellipse, ring or capsule, possibly rotated and wobbled by a smooth random field) whose centre and size
  are keyframed along t, so one axial slice costs a few dozen small numpy operations, each limited to a
  structure's bounding box. Spacing, origin and axis flips only change where the voxel centres fall,
  so every geometry shows the same body at the same physical scale.
- Lymph nodes (generator version 2) live in nodal stations: the fat along the vessels and airways that
  nodes drain beside (cervical jugular chain, mediastinal, hilar, retrocrural / para-aortic / aortocaval,
  the mesenteric root around the superior mesenteric vessels, iliac chains, inguinal; no axillary station,
  the phantoms have no arms). Each case has 14-27 normal nodes there (4-9 mm short axis, oval, a fatty
  hilum; tissue class NODE, never lesions); enlarged nodes (lesions, 10-40 mm, homogeneous 30-70 HU) are
  centred in station fat and come several to a station. Bowel walls are 3.5 mm (they survive 3 mm
  resampling), bowel fluid 0-20 HU, or 150-350 HU in the 40 % of patients given positive oral contrast.
- A tissue-class map is painted alongside the HU values; lesions are placed by sampling a voxel of
  their host tissue, shaped as wobbled ellipsoids or unions of blobs, clipped to the host tissue and
  painted inside their bounding box only. The label is exactly the set of voxels painted with lesion
  intensity. Lesions never touch each other, so each manifest volume is (voxel count) x (voxel volume)
  of one connected lesion.
- Last, Gaussian white noise and a mild in-plane blur (which also makes the noise spatially correlated,
  as in reconstructed CT) are applied slab by slab and the volume is converted to int16.
- Every random draw of case `index` comes from `SeedSequence([seed, index])`, and nothing depends on
  BLAS threading, so a case is the same whatever else is generated with it.

Modules: case.py (tissue classes, lesion types, the Phantom a case is returned as), anatomy.py (the body
and its renderer), lesions.py, generate.py (a whole case; the FLARE sizes), writing.py (the FLARE layout),
cli.py.
"""
from .case import (AIR, AIRWAY, BOWEL, CORTEX, CSF, FAT, FLARE_SLICE_COUNTS, GENERATOR_VERSION,  # noqa: F401
                   HEALTHY_INDEX_BASE, KIDNEY, LESION, LESION_TYPES, LIVER, LUNG, MARROW, MUSCLE, NODAL_FAT, NODE,
                   ORGAN, SPLEEN, SUBCUT, TABLE, TISSUE_NAMES, VESSEL, Phantom, PhantomError)
from .generate import flare_case_specs, generate_flare_case, generate_phantom  # noqa: F401
from .writing import write_case, write_dataset, write_eval_set  # noqa: F401
