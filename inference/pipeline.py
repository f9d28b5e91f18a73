"""One case through the engine, stage by stage: crop -> resample + normalise -> sliding window ->
lesion filter -> argmax + resample back -> paste. Reading and writing files is the caller's (see cli.py).

On a GPU everything between the upload of the cropped image and the download of the final mask stays
on the device.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .crop import body_bounding_box, no_crop
from .errors import CaseError
from .lesion_filter import filter_lesions
from .model import LoadedModel, load_model
from .normalize import NORMALIZERS
from .postprocess import lesion_label_ids, lesion_mask_at_shape
from .resample import resample_channels, shape_at_spacing
from .out_of_memory import out_of_memory_attempts, run_attempt
from .patch_policy import PATCH_SCALE, inference_patch_size
from .time_budget import BUDGET_RESERVE, step_for_time_budget
from .timing import CaseReport, StageTimer

log = logging.getLogger("inference")


@dataclass
class PredictionSettings:
    step_size: float = 0.5
    patch_size: tuple[int, int, int] | None = None  # None: training patch x patch_scale
    patch_scale: float = PATCH_SCALE
    tta: bool = False
    crop: bool = True
    crop_threshold_hu: float = -500.0
    crop_margin_mm: float = 10.0
    crop_function: Callable | None = None  # replaces the body crop: (array, spacing) -> slices
    lesion_labels: tuple[int, ...] | None = None  # None: every non-background label
    resample_back: str = "logits"  # "logits" (trilinear, then argmax) or "labels" (argmax, nearest)
    min_lesion_ml: float | None = None  # None: the model's lesion_filter.json (see lesion_filter.py)
    min_lesion_probability: float | None = None
    gpu_memory_budget_mb: float = 4096.0  # whole-device peak the inference patch must respect (FLARE)
    # Bounds on a case's grid at the model's spacing (check_model_grid): a whole-body CT at 1 mm is ~10^8.5
    # voxels; 2^28 (~268 M) leaves room and refuses a header in the wrong unit before it allocates terabytes.
    max_model_voxels: int = 2 ** 28
    max_upsampling: float = 64.0  # 4x per axis: 12 mm voxels to a 3 mm model; 60 mm voxels are refused
    # Seconds a case may take from the start of predict_array (the CLI takes the read off): when the network
    # is predicted to overrun what is left, a larger step is taken (step_for_time_budget). None: no budget.
    time_budget_s: float | None = None
    progress: bool = False
    extra: dict = field(default_factory=dict)


def crop_box(array: np.ndarray, spacing: tuple[float, ...], settings: PredictionSettings):
    if settings.crop_function is not None:
        return settings.crop_function(array, spacing)
    if not settings.crop:
        return no_crop(array, spacing)
    return body_bounding_box(array, spacing, threshold_hu=settings.crop_threshold_hu,
                             margin_mm=settings.crop_margin_mm)


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


@dataclass
class NetworkResult:
    """The sliding window's logits [K, z, y, x] and how they were made."""

    logits: torch.Tensor
    patch_size: tuple[int, ...]
    step_size: float
    predicted_gpu_peak_mb: float | None = None


def model_space_logits(volume: torch.Tensor, model: LoadedModel, settings: PredictionSettings,
                       seconds_left: float | None = None) -> NetworkResult:
    """Sliding-window logits of a model-space volume, with the patch and step used.

    With `seconds_left` (a time budget), the step may be enlarged to fit it (step_for_time_budget). Out of
    GPU memory, each of `out_of_memory_attempts` is tried in turn (a warning says which)."""
    predicted = None
    patch = settings.patch_size
    if patch is None:
        patch, predicted = inference_patch_size(volume, model, settings)
    if seconds_left is not None:
        settings = replace(settings, step_size=step_for_time_budget(volume, model, settings, patch, seconds_left))
    attempts = out_of_memory_attempts(patch, model)
    for attempt, following in zip(attempts, attempts[1:]):
        try:
            logits = run_attempt(volume, model, settings, attempt)
            return NetworkResult(logits, attempt.patch, settings.step_size, predicted)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("warning: out of GPU memory; retrying with %s", following.label)
    last = attempts[-1]
    return NetworkResult(run_attempt(volume, model, settings, last), last.patch, settings.step_size, predicted)


def predict_array_with_report(array: np.ndarray, spacing: tuple[float, ...], model: LoadedModel,
                              settings: PredictionSettings | None = None, report: CaseReport | None = None
                              ) -> tuple[np.ndarray, CaseReport]:
    """Lesion mask (uint8 0/1, same shape) for a (z, y, x) CT array with (z, y, x) spacing in mm, and the
    case's report (`report`, if given, is the one filled: the CLI's, which already holds the read)."""
    settings = settings or PredictionSettings()
    report = report if report is not None else CaseReport()
    started = time.perf_counter()
    timer = StageTimer(report, model.device)
    config = model.config
    with timer("crop"):
        box = crop_box(array, spacing, settings)
        check_model_grid(tuple(len(range(*s.indices(n))) for s, n in zip(box, array.shape)), spacing, model,
                         settings)
        cropped = array[box].copy()  # contiguous, writable: torch needs both
    with timer("resample"):
        volume = to_model_space(cropped, spacing, model)
    with timer("network"):
        seconds_left = None
        if settings.time_budget_s is not None:
            seconds_left = settings.time_budget_s * (1 - BUDGET_RESERVE) - (time.perf_counter() - started)
        network = model_space_logits(volume, model, settings, seconds_left)
        del volume
    logits = network.logits
    report.patch_size, report.step_size = network.patch_size, network.step_size
    report.predicted_gpu_peak_mb = network.predicted_gpu_peak_mb
    del network  # the logits are freed with their last name, in the export
    lesion_ids = lesion_label_ids(config.labels, settings.lesion_labels)
    lesion_filter = model.lesion_filter.with_overrides(settings.min_lesion_ml, settings.min_lesion_probability)
    if lesion_filter.active:
        with timer("filter"):
            logits, found, dropped = filter_lesions(logits, lesion_ids, config.voxel_ml, lesion_filter)
        report.lesions_dropped = (dropped, found)
    with timer("export"):
        cropped_shape = tuple(cropped.shape[a] for a in config.transpose_forward)
        mask = lesion_mask_at_shape(logits, cropped_shape, lesion_ids, settings.resample_back)
        del logits
        mask = mask.permute(*config.transpose_backward).cpu().numpy()
        full = np.zeros(array.shape, dtype=np.uint8)
        full[box] = mask
    return full, report


def predict_array(array: np.ndarray, spacing: tuple[float, ...], model: LoadedModel,
                  settings: PredictionSettings | None = None) -> np.ndarray:
    """Lesion mask (uint8 0/1, same shape) for a (z, y, x) CT array with (z, y, x) spacing in mm."""
    return predict_array_with_report(array, spacing, model, settings)[0]


def predict_image_with_report(image: sitk.Image, model: LoadedModel | str | Path,
                              settings: PredictionSettings | None = None, report: CaseReport | None = None
                              ) -> tuple[sitk.Image, CaseReport]:
    """Lesion mask for a CT already in memory: SimpleITK image in, uint8 0/1 SimpleITK image out, with
    exactly the input's size, spacing, origin and direction; and the case's report. `model` is a
    LoadedModel or a model folder.
    """
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    if model.config.num_input_channels != 1:
        raise CaseError(f"{model.config.model_dir}: model expects {model.config.num_input_channels} "
                        "channels; only single-channel CT models are supported")
    array = sitk.GetArrayViewFromImage(image)
    spacing = tuple(image.GetSpacing())[::-1]
    mask, report = predict_array_with_report(array, spacing, model, settings, report)
    output = sitk.GetImageFromArray(mask)
    output.CopyInformation(image)
    return output, report


def predict_image(image: sitk.Image, model: LoadedModel | str | Path,
                  settings: PredictionSettings | None = None) -> sitk.Image:
    """Lesion mask for a CT already in memory (see predict_image_with_report)."""
    return predict_image_with_report(image, model, settings)[0]
