"""Pictures of predictions against the truth: what a person would rather look at than read.

Per case, `<case>.png`: the axial slice through the largest true lesion (or, in a healthy case, through the
largest predicted one), and beside it the slice through the largest false positive when there is one; CT in
a soft-tissue window (level 40, width 400 HU), the truth outlined in green and the prediction in magenta, the
case's DSC / NSD in the title. And `overview.png`: every case's first panel on one page.

    python -m evaluation.run_metrics --gt LABELS --pred PREDICTIONS -o metrics.csv --overlays DIR [--images DIR]
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk

from flare_common.files import atomic_path
from inference import CaseError
from inference.io import read_checked

WINDOW_HU = (40 - 200, 40 + 200)  # soft tissue: level 40, width 400
TRUTH_COLOUR, PREDICTION_COLOUR = "#2ca02c", "#e377c2"


@dataclass
class Panel:
    """One axial slice to draw, and why it was chosen."""

    z: int
    why: str


def largest_component_slice(mask: np.ndarray, exclude: np.ndarray | None = None) -> tuple[int, int] | None:
    """(z of the axial slice where the largest 26-connected component of `mask` is widest, its voxel count);
    components touching `exclude` are left out. None when there is none."""
    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    if exclude is not None and exclude.any():
        counts[np.unique(labels[exclude])] = 0
    if not counts.any():
        return None
    largest = int(counts.argmax())
    per_slice = (labels == largest).sum(axis=(1, 2))
    return int(per_slice.argmax()), int(counts[largest])


def choose_panels(truth: np.ndarray, prediction: np.ndarray) -> list[Panel]:
    """The slice through the largest true lesion (healthy case: the largest predicted lesion; else the middle),
    then the slice through the largest false positive (a predicted component touching no true lesion)."""
    panels = []
    largest_truth = largest_component_slice(truth)
    if largest_truth is not None:
        panels.append(Panel(largest_truth[0], "largest lesion"))
    false_positive = largest_component_slice(prediction, exclude=truth)
    if false_positive is not None:
        panels.append(Panel(false_positive[0], "largest false positive"))
    if not panels:
        panels.append(Panel(truth.shape[0] // 2, "middle slice (nothing to show)"))
    return panels


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_panel(axis, ct: np.ndarray, truth: np.ndarray, prediction: np.ndarray, panel: Panel,
               aspect: float) -> None:
    axis.imshow(ct[panel.z], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect)
    for mask, colour in ((truth, TRUTH_COLOUR), (prediction, PREDICTION_COLOUR)):
        if mask[panel.z].any():
            axis.contour(mask[panel.z].astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
    axis.set_title(f"z = {panel.z}: {panel.why}", fontsize="small")
    axis.set_axis_off()


def read_case(image: Path, truth: Path, prediction: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """CT (HU), truth and prediction as (z, y, x) arrays, and the in-plane aspect (row / column spacing). A
    prediction that is missing, unreadable or of another size than the truth is drawn as none (run_metrics
    scored it and said why); CaseError where the CT or the truth cannot be read or differ in size."""
    ct_image = read_checked(image)
    ct = sitk.GetArrayFromImage(ct_image)
    truth_array = sitk.GetArrayFromImage(read_checked(truth)) > 0
    if truth_array.shape != ct.shape:
        raise CaseError(f"{truth}: {truth_array.shape[::-1]} voxels, its image {image.name} {ct.shape[::-1]}")
    try:
        prediction_array = sitk.GetArrayFromImage(read_checked(prediction)) > 0
    except CaseError:
        prediction_array = np.zeros_like(truth_array)
    if prediction_array.shape != truth_array.shape:
        prediction_array = np.zeros_like(truth_array)
    spacing_x, spacing_y = ct_image.GetSpacing()[:2]
    return ct, truth_array, prediction_array, spacing_y / spacing_x


def case_figure(image: Path, truth: Path, prediction: Path, title: str, out: Path) -> None:
    """`out`: the case's panels side by side, with a legend for the two outlines."""
    plt = _pyplot()
    ct, truth_array, prediction_array, aspect = read_case(image, truth, prediction)
    panels = choose_panels(truth_array, prediction_array)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        draw_panel(axis, ct, truth_array, prediction_array, panel, aspect)
    legend = [plt.Line2D([], [], color=TRUTH_COLOUR, label="truth"),
              plt.Line2D([], [], color=PREDICTION_COLOUR, label="prediction")]
    figure.legend(handles=legend, loc="lower center", ncol=2, frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(out) as written:
        figure.savefig(written, dpi=90)
    plt.close(figure)


def overview_figure(cases: list[tuple[str, Path, Path, Path]], out: Path, columns: int = 4) -> None:
    """`out`: each case's first panel (largest lesion, else largest prediction), titled with its scores.
    `cases`: (title, image, truth, prediction)."""
    plt = _pyplot()
    rows = math.ceil(len(cases) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.6 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.set_axis_off()
    for axis, (title, image, truth, prediction) in zip(axes.ravel(), cases):
        ct, truth_array, prediction_array, aspect = read_case(image, truth, prediction)
        draw_panel(axis, ct, truth_array, prediction_array, choose_panels(truth_array, prediction_array)[0],
                   aspect)
        axis.set_title(title.replace("  ", "\n", 1), fontsize="small")  # the case above its scores
    legend = [plt.Line2D([], [], color=TRUTH_COLOUR, label="truth"),
              plt.Line2D([], [], color=PREDICTION_COLOUR, label="prediction")]
    figure.legend(handles=legend, loc="lower center", ncol=2, frameon=False)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    with atomic_path(out) as written:
        figure.savefig(written, dpi=80)
    plt.close(figure)


def case_title(row) -> str:
    """"case  DSC 0.81  NSD 0.77  lesions 3/4  FP 1.2 ml" from a run_metrics per-case row."""
    parts = [str(row["case"])]
    for label, column in (("DSC", "Lesion_DSC"), ("NSD", "Lesion_NSD")):
        value = row.get(column)
        parts.append(f"{label} {value:.2f}" if isinstance(value, (int, float)) and value == value else f"{label} -")
    if row.get("gt_lesions") == row.get("gt_lesions") and row.get("gt_lesions") is not None:
        parts.append(f"lesions {int(row['detected_lesions'])}/{int(row['gt_lesions'])}")
    if row.get("fp_volume_ml") == row.get("fp_volume_ml") and row.get("fp_volume_ml") is not None:
        parts.append(f"FP {row['fp_volume_ml']:.1f} ml")
    return "  ".join(parts)


def write_overlays(per_case, images: Path, labels: Path, predictions: Path, out_dir: Path,
                   warn=lambda message: print(message, file=sys.stderr)) -> list[Path]:
    """A PNG per scored case (those with an image) and overview.png; returns the paths written. A case whose
    CT or truth cannot be read is left out with one line through `warn`."""
    out_dir = Path(out_dir)
    written, overview = [], []
    for _, row in per_case.iterrows():
        case = row["case"]
        image = next((p for p in (images / f"{case}_0000.nii.gz", images / f"{case}.nii.gz") if p.is_file()), None)
        truth = labels / f"{case}.nii.gz"
        if image is None or not truth.is_file():
            continue
        prediction = predictions / f"{case}.nii.gz"
        title = case_title(row)
        try:
            case_figure(image, truth, prediction, title, out_dir / f"{case}.png")
        except CaseError as error:
            warn(f"warning: no picture of case {case}: {error}")
            continue
        written.append(out_dir / f"{case}.png")
        overview.append((title, image, truth, prediction))
    if overview:
        overview_figure(overview, out_dir / "overview.png")
        written.append(out_dir / "overview.png")
    return written
