"""One case through the engine, stage by stage: body box -> resample + normalise -> sliding window over the
body's windows -> lesion filter -> argmax + resample back -> the mask inside the body box. Reading and writing
files is the caller's (see cli.py).

The crop (settings.crop) is exact by default: the whole volume is resampled and tiled as without a crop, and only the
windows that meet the body (its box in model space, crop.model_space_region) are run. Inside the body box the mask is
the one a run without the crop makes, voxel for voxel; outside it is 0. It skips only windows that hold no body: few
where the body spans most of each axis, as on our phantoms (results/exact_crop_*.md). The box crop cuts the box out
and tiles the cut on its own: fewer windows and a smaller resampling, but windows placed elsewhere, so another mask;
only a model's calibration record (calibrate.py) chooses it.

On a GPU everything between the upload of the cropped image and the download of the final mask stays
on the device.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .crop import body_bounding_box, model_space_region, no_crop
from .errors import CaseError
from .lesion_filter import filter_lesions
from .model import LoadedModel, load_model
from .network_plan import calibrated_settings, network_logits, seconds_left
from .normalize import NORMALIZERS
from .postprocess import lesion_label_ids, lesion_mask_at_shape, lesion_probability_at_shape
from .resample import resample_channels, shape_at_spacing
from .settings import PredictionSettings
from .timing import CaseReport, StageTimer

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["check_model_grid", "crop_box", "predict_array", "predict_array_with_probability",
           "predict_array_with_report", "predict_image", "predict_image_with_probability", "predict_image_with_report",
           "to_model_space"]

log = logging.getLogger("inference")


def crop_box(array: np.ndarray, spacing: tuple[float, ...], settings: PredictionSettings) -> tuple[slice, ...]:
    """Where the mask may be non-zero: the body's bounding box (crop.py), or all of the array."""
    if settings.crop == "none":
        return no_crop(array, spacing)
    return body_bounding_box(array, spacing, threshold_hu=settings.crop_threshold_hu,
                             margin_mm=settings.crop_margin_mm)


def resampled_part(array: np.ndarray, spacing: tuple[float, ...], box: tuple[slice, ...],
                   settings: PredictionSettings) -> tuple[slice, ...]:
    """The part of the array resampled and tiled: the box itself for the box crop, else the whole array (the exact
    crop keeps the whole volume's grid and skips windows instead)."""
    return box if settings.crop == "box" else no_crop(array, spacing)


def check_model_grid(cropped_shape: tuple[int, ...], spacing: tuple[float, ...], model: LoadedModel,
                     settings: PredictionSettings) -> None:
    """Refuse (CaseError) a case whose grid at the model's spacing is unreasonably large: a bogus header
    (spacing in the wrong unit, 60 mm voxels) turns a small file into hours of network time or an
    allocation of terabytes."""
    config = model.config
    shape = tuple(cropped_shape[a] for a in config.transpose_forward)
    target = shape_at_spacing(shape, tuple(spacing[a] for a in config.transpose_forward), config.spacing)
    voxels, source = math.prod(target), math.prod(shape)
    grid = "x".join(map(str, target))
    if voxels > settings.max_model_voxels:
        gigabytes = voxels * (config.num_classes + 1) * 4 / 1e9
        raise CaseError(f"{'x'.join(map(str, shape))} voxels of {spacing} mm would be {grid} voxels at the "
                        f"model's spacing (about {gigabytes:,.0f} GB), over the limit of "
                        f"{settings.max_model_voxels:,}: is the header's spacing in mm?")
    if voxels > settings.max_upsampling * source:
        raise CaseError(f"voxels of {spacing} mm would be up-sampled {voxels / source:,.0f}x to the model's "
                        f"{config.spacing} mm ({grid}), over the limit of {settings.max_upsampling:g}x: "
                        "is the header's spacing right?")


def to_model_space(cropped: np.ndarray, spacing: tuple[float, ...], model: LoadedModel) -> torch.Tensor:
    """Upload, transpose, normalise, then resample to the model's spacing: [1, z, y, x] on the device.

    Normalising before resampling, as nnU-Net does, keeps the clipping identical to training.
    """
    config = model.config
    volume = torch.from_numpy(cropped).to(model.device).to(torch.float32)
    volume = volume.permute(*config.transpose_forward)[None]
    spacing = tuple(spacing[a] for a in config.transpose_forward)
    normalize = NORMALIZERS.get(config.normalization_scheme)
    if normalize is None:
        raise CaseError(f"{config.model_dir}: unsupported normalisation '{config.normalization_scheme}'")
    volume = normalize(volume, config.intensity_properties)
    volume = resample_channels(volume, shape_at_spacing(volume.shape[1:], spacing, config.spacing))
    return volume.half() if model.device.type == "cuda" else volume


def predict_array_with_report(array: np.ndarray, spacing: tuple[float, ...], model: LoadedModel,
                              settings: PredictionSettings | None = None, report: CaseReport | None = None,
                              started: float | None = None, progress: bool = False
                              ) -> tuple[np.ndarray, CaseReport]:
    """Lesion mask (uint8 0/1, same shape) for a (z, y, x) CT array with (z, y, x) spacing in mm, and the
    case's report (`report`, if given, is the one filled: the CLI's, which already holds the read).

    `settings`: default the model's calibrated ones (network_plan.calibrated_settings). `started`: when the case
    began (time.perf_counter), for its time budget; default now. `progress`: a bar over the windows."""
    mask, _, report = predict_array_with_probability(array, spacing, model, settings, report, started, progress,
                                                     probability=False)
    return mask, report


def predict_array_with_probability(array: np.ndarray, spacing: tuple[float, ...], model: LoadedModel,
                                   settings: PredictionSettings | None = None, report: CaseReport | None = None,
                                   started: float | None = None, progress: bool = False, probability: bool = True
                                   ) -> tuple[np.ndarray, np.ndarray | None, CaseReport]:
    """predict_array_with_report, and (with `probability`) the lesion probability at the array's shape as uint8
    round(p * 255) (postprocess.lesion_probability_at_shape), 0 outside the body box, where the mask is 0 too."""
    settings = settings or calibrated_settings(model)[0]
    report = report if report is not None else CaseReport()
    predict_started = time.perf_counter()
    started = predict_started if started is None else started
    timer = StageTimer(report, model.device)
    config = model.config
    with timer("crop"):
        box = crop_box(array, spacing, settings)
        part = resampled_part(array, spacing, box, settings)
        part_shape = tuple(len(range(*s.indices(n))) for s, n in zip(part, array.shape))
        check_model_grid(part_shape, spacing, model, settings)
    with timer("resample"):
        volume = to_model_space(np.array(array[part]), spacing, model)  # contiguous, writable: torch needs both
        region = (model_space_region(box, array.shape, tuple(volume.shape[1:]), config.transpose_forward)
                  if settings.crop == "exact" else None)
    with timer("network"):
        network = network_logits(volume, model, settings, seconds_left(settings, started, predict_started), progress,
                                 region)
        del volume
    logits = network.logits
    report.patch_size, report.step_size, report.windows = network.patch_size, network.step_size, network.windows
    report.predicted_gpu_peak_mb = network.predicted_gpu_peak_mb
    del network  # the logits are freed with their last name, in the export
    lesion_ids = lesion_label_ids(config.labels, settings.lesion_labels)
    lesion_filter = model.lesion_filter.with_overrides(settings.min_lesion_ml, settings.min_lesion_probability)
    if lesion_filter.active:
        with timer("filter"):
            logits, found, dropped = filter_lesions(logits, lesion_ids, config.voxel_ml, lesion_filter)
        report.lesions_dropped = (dropped, found)
    inside_box = tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(box, part))
    shape = tuple(part_shape[a] for a in config.transpose_forward)

    def in_input_space(volume: torch.Tensor) -> np.ndarray:
        full = np.zeros(array.shape, dtype=np.uint8)
        full[box] = volume.permute(*config.transpose_backward).cpu().numpy()[inside_box]
        return full

    lesion_probability = None
    if probability:
        with timer("probability"):
            lesion_probability = in_input_space(lesion_probability_at_shape(logits, shape, lesion_ids))
    with timer("export"):
        mask = in_input_space(lesion_mask_at_shape(logits, shape, lesion_ids, settings.resample_back))
        del logits
    return mask, lesion_probability, report


def predict_array(array: np.ndarray, spacing: tuple[float, ...], model: LoadedModel,
                  settings: PredictionSettings | None = None) -> np.ndarray:
    """Lesion mask (uint8 0/1, same shape) for a (z, y, x) CT array with (z, y, x) spacing in mm."""
    return predict_array_with_report(array, spacing, model, settings)[0]


def predict_image_with_report(image: sitk.Image, model: LoadedModel | str | Path,
                              settings: PredictionSettings | None = None, report: CaseReport | None = None,
                              started: float | None = None, progress: bool = False
                              ) -> tuple[sitk.Image, CaseReport]:
    """Lesion mask for a CT already in memory: SimpleITK image in, uint8 0/1 SimpleITK image out, with
    exactly the input's size, spacing, origin and direction; and the case's report. `model` is a
    LoadedModel or a model folder (loaded with the torch backend). `started`, `progress`: as for
    predict_array_with_report.
    """
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    if model.config.num_input_channels != 1:
        raise CaseError(f"{model.config.model_dir}: model expects {model.config.num_input_channels} "
                        "channels; only single-channel CT models are supported")
    array = sitk.GetArrayViewFromImage(image)
    spacing = tuple(image.GetSpacing())[::-1]
    mask, report = predict_array_with_report(array, spacing, model, settings, report, started, progress)
    output = sitk.GetImageFromArray(mask)
    output.CopyInformation(image)
    return output, report


def predict_image_with_probability(image: sitk.Image, model: LoadedModel, settings: PredictionSettings | None = None,
                                   report: CaseReport | None = None, started: float | None = None,
                                   progress: bool = False) -> tuple[sitk.Image, sitk.Image, CaseReport]:
    """predict_image_with_report, and the lesion probability as a uint8 image round(p * 255) on the input's grid."""
    array = sitk.GetArrayViewFromImage(image)
    spacing = tuple(image.GetSpacing())[::-1]
    mask, probability, report = predict_array_with_probability(array, spacing, model, settings, report, started,
                                                               progress)
    images = []
    for volume in (mask, probability):
        output = sitk.GetImageFromArray(volume)
        output.CopyInformation(image)
        images.append(output)
    return images[0], images[1], report


def predict_image(image: sitk.Image, model: LoadedModel | str | Path,
                  settings: PredictionSettings | None = None) -> sitk.Image:
    """Lesion mask for a CT already in memory (see predict_image_with_report)."""
    return predict_image_with_report(image, model, settings)[0]
