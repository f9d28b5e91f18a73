"""Pictures of predictions against the truth: what a person would rather look at than read.

Per case, `<case>.png`: the axial slice through the largest true lesion (or, in a healthy case, through the
largest predicted one), and beside it the slice through the largest false positive where one of at least
MIN_FALSE_POSITIVE_ML exists; CT in a soft-tissue window (level 40, width 400 HU, said on the picture), the truth
outlined in green and the prediction in magenta (2-pixel lines), the patient's sides lettered at the edges (R/L,
A/P, from the image's direction), the case's DSC / NSD in the title. And `overview.png`: every case's first panel
on one page, as many columns as cases up to four.

    python -m evaluation.run_metrics --gt LABELS --pred PREDICTIONS -o metrics.csv --overlays DIR [--images DIR]
"""
from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk

from flare_common.files import atomic_path
from inference import CaseError
from inference.io import read_checked

WINDOW_HU = (40 - 200, 40 + 200)  # soft tissue: level 40, width 400
WINDOW_TEXT = "window: level 40, width 400 HU"
TRUTH_COLOUR, PREDICTION_COLOUR = "#2ca02c", "#e377c2"
LINE_WIDTH = 2.0  # points: 2.5 pixels at the pictures' 90 dpi, visible on a 512 x 512 slice shrunk to 5 inches
MIN_FALSE_POSITIVE_ML = 0.1  # smaller false positives get no panel of their own (specks the scores count anyway)
MAX_COLUMNS = 4
# LPS: the patient's side each axis points to, positive direction first
SIDES = (("L", "R"), ("P", "A"), ("S", "I"))
EDGE_PLACES = {"left": (0.02, 0.5, "left", "center"), "right": (0.98, 0.5, "right", "center"),
               "top": (0.5, 0.98, "center", "top"), "bottom": (0.5, 0.02, "center", "bottom")}


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


def choose_panels(truth: np.ndarray, prediction: np.ndarray, voxel_ml: float = 0.0) -> list[Panel]:
    """The slice through the largest true lesion (healthy case: the largest predicted lesion; else the middle),
    then the slice through the largest false positive (a predicted component touching no true lesion) where it
    holds at least MIN_FALSE_POSITIVE_ML (`voxel_ml`: a voxel's volume; 0 draws any)."""
    panels = []
    largest_truth = largest_component_slice(truth)
    if largest_truth is not None:
        panels.append(Panel(largest_truth[0], "largest lesion"))
    false_positive = largest_component_slice(prediction, exclude=truth)
    if false_positive is not None:
        z, voxels = false_positive
        if not voxel_ml:
            panels.append(Panel(z, "largest false positive"))
        elif voxels * voxel_ml >= MIN_FALSE_POSITIVE_ML:
            panels.append(Panel(z, f"largest false positive ({voxels * voxel_ml:.1f} ml)"))
    if not panels:
        panels.append(Panel(truth.shape[0] // 2, "middle slice (nothing to show)"))
    return panels


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def edge_letters(direction: tuple[float, ...]) -> dict[str, str]:
    """The patient's side at each edge of an axial slice drawn as array rows (y) down and columns (x) right, from a
    SimpleITK direction (9 values, LPS): {"left", "right", "top", "bottom"} -> "R", "L", "A", "P", ...; for an
    oblique axis, the side it points to most."""
    matrix = np.asarray(direction, float).reshape(3, 3)

    def side(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return SIDES[axis][0 if vector[axis] > 0 else 1]

    column, row = matrix[:, 0], matrix[:, 1]
    return {"right": side(column), "left": side(-column), "bottom": side(row), "top": side(-row)}


def draw_panel(axis, ct: np.ndarray, truth: np.ndarray, prediction: np.ndarray, panel: Panel,
               aspect: float, letters: dict[str, str] | None = None) -> None:
    axis.imshow(ct[panel.z], cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect)
    for mask, colour in ((truth, TRUTH_COLOUR), (prediction, PREDICTION_COLOUR)):
        if mask[panel.z].any():
            axis.contour(mask[panel.z].astype(float), levels=[0.5], colors=[colour], linewidths=LINE_WIDTH)
    for edge, (x, y, ha, va) in EDGE_PLACES.items() if letters else ():
        axis.text(x, y, letters[edge], transform=axis.transAxes, ha=ha, va=va, color="yellow", fontsize="medium",
                  fontweight="bold")
    axis.set_title(f"z = {panel.z}: {panel.why}", fontsize="small")
    axis.set_axis_off()


@dataclass
class CaseView:
    """What a case's pictures are drawn from: CT (HU), truth and prediction as (z, y, x) arrays, the in-plane aspect
    (row / column spacing), a voxel's volume and the edges' letters."""

    ct: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    aspect: float
    voxel_ml: float
    letters: dict[str, str]


def read_case(image: Path, truth: Path, prediction: Path) -> CaseView:
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
    spacing = ct_image.GetSpacing()
    return CaseView(ct, truth_array, prediction_array, spacing[1] / spacing[0], float(np.prod(spacing)) / 1000,
                    edge_letters(ct_image.GetDirection()))


def case_figure(image: Path, truth: Path, prediction: Path, title: str, out: Path) -> None:
    """`out`: the case's panels side by side, with a legend for the two outlines."""
    plt = _pyplot()
    view = read_case(image, truth, prediction)
    panels = choose_panels(view.truth, view.prediction, view.voxel_ml)
    # constrained layout keeps every title and the legend inside the figure, whatever their lengths
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.8), squeeze=False,
                                layout="constrained")
    for axis, panel in zip(axes[0], panels):
        draw_panel(axis, view.ct, view.truth, view.prediction, panel, view.aspect, view.letters)
    figure.legend(handles=legend_handles(plt), loc="outside lower center", ncol=3, frameon=False)
    figure.suptitle("\n".join(textwrap.wrap(title, width=int(60 * len(panels)))))
    with atomic_path(out) as written:
        figure.savefig(written, dpi=90, bbox_inches="tight")  # nothing drawn is cut off at an edge
    plt.close(figure)


def overview_figure(cases: list[tuple[str, Path, Path, Path]], out: Path, columns: int = MAX_COLUMNS) -> None:
    """`out`: each case's first panel (largest lesion, else largest prediction), titled with its scores.
    `cases`: (title, image, truth, prediction)."""
    plt = _pyplot()
    columns = overview_columns(len(cases), columns)
    rows = math.ceil(len(cases) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 4.0 * rows + 0.4), squeeze=False,
                                layout="constrained")
    for axis in axes.ravel():
        axis.set_axis_off()
    for axis, (title, image, truth, prediction) in zip(axes.ravel(), cases):
        view = read_case(image, truth, prediction)
        draw_panel(axis, view.ct, view.truth, view.prediction,
                   choose_panels(view.truth, view.prediction, view.voxel_ml)[0], view.aspect, view.letters)
        # the case above its scores, wrapped to the panel's width so that neighbours' titles never overlap
        case, *scores = title.split("  ")
        axis.set_title("\n".join([case, *packed(scores, width=30)]), fontsize="small")
    figure.legend(handles=legend_handles(plt), loc="outside lower center", ncol=3, frameon=False)
    with atomic_path(out) as written:
        figure.savefig(written, dpi=80, bbox_inches="tight")
    plt.close(figure)


def packed(parts: list[str], width: int) -> list[str]:
    """The parts ("DSC 0.81", "lesions 3/4", ...) on as few lines of at most `width` characters as they fit, never
    broken inside a part."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "  " + part
        else:
            lines.append(part)
    return lines


def overview_columns(cases: int, most: int = MAX_COLUMNS) -> int:
    """As many columns as cases, up to `most`: one case is one panel wide, not a row with three empty ones."""
    return max(1, min(cases, most))


def legend_handles(plt) -> list:
    """The two outlines' colours, and the window the CT is shown in."""
    return [plt.Line2D([], [], color=TRUTH_COLOUR, linewidth=LINE_WIDTH, label="truth"),
            plt.Line2D([], [], color=PREDICTION_COLOUR, linewidth=LINE_WIDTH, label="prediction"),
            plt.Line2D([], [], color="none", label=WINDOW_TEXT)]


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
