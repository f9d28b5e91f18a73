"""Write a model folder in nnU-Net v2 layout (plans.json, dataset.json, fold_X/checkpoint_final.pth).

Used by our training scripts and tests, so that every model we make goes through exactly the loader that
real nnU-Net models use, and so that nnU-Net's own `nnUNetPredictor` can load it for comparisons.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from flare_common.files import atomic_path

from inference.model import build_network, fold_dir_name, read_model_config

_IMPORTED_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")
# CTNormalization statistics of a model that was never trained (benchmarks time such models)
SYNTHETIC_CT_INTENSITIES = {"mean": 50.0, "std": 150.0, "percentile_00_5": -900.0, "percentile_99_5": 900.0}


def plain_unet_arch_kwargs(n_stages: int, base_features: int = 32, max_features: int = 320,
                           strides: list | None = None, kernel_sizes: list | None = None,
                           n_conv_per_stage: int | list[int] = 2, residual: bool = False,
                           n_conv_per_stage_decoder: int | list[int] | None = None) -> dict:
    """arch_kwargs as nnU-Net >= 2.3.1 writes them for a 3D PlainConvUNet / ResidualEncoderUNet. Conv (block)
    counts are one number for every stage or a list, one per stage; the decoder's default to the encoder's
    (its stages mirror all but the deepest encoder stage)."""
    def per_stage(count, n):
        counts = [count] * n if isinstance(count, int) else list(count)
        if len(counts) != n:
            raise ValueError(f"{len(counts)} conv counts for {n} stages")
        return counts

    decoder = n_conv_per_stage_decoder
    if decoder is None:
        decoder = n_conv_per_stage if isinstance(n_conv_per_stage, int) else list(n_conv_per_stage)[:-1]
    strides = strides or [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    kernel_sizes = kernel_sizes or [[3, 3, 3]] * n_stages
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": [min(base_features * 2 ** i, max_features) for i in range(n_stages)],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": kernel_sizes,
        "strides": strides,
        ("n_blocks_per_stage" if residual else "n_conv_per_stage"): per_stage(n_conv_per_stage, n_stages),
        "n_conv_per_stage_decoder": per_stage(decoder, n_stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return kwargs


def make_plans(*, spacing: list[float], patch_size: list[int], arch_kwargs: dict,
               intensity_properties: Mapping[str, float], residual: bool = False,
               dataset_name: str = "Dataset001_Lesions", configuration: str = "3d_fullres",
               plans_name: str = "nnUNetPlans", median_shape: list[int] | None = None) -> dict:
    """A plans.json dict in the current (`architecture`) format, loadable by nnU-Net v2 too."""
    network = "ResidualEncoderUNet" if residual else "PlainConvUNet"
    resampling_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(median_shape or patch_size),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            configuration: {
                "data_identifier": f"{plans_name}_{configuration}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch_size),
                "median_image_size_in_voxels": list(median_shape or patch_size),
                "spacing": list(spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling_kwargs,
                "resampling_fn_seg_kwargs": {**resampling_kwargs, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resampling_kwargs, "order": 1},
                "architecture": {
                    "network_class_name":
                        f"dynamic_network_architectures.architectures.unet.{network}",
                    "arch_kwargs": arch_kwargs,
                    "_kw_requires_import": list(_IMPORTED_KWARGS),
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(intensity_properties)},
    }


def make_dataset_json(labels: Mapping[str, int] | None = None, num_training: int = 0) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(labels or {"background": 0, "lesion": 1}),
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def shared_cpu_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` on the CPU, detached, with the sharing between names kept: dynamic-network-architectures'
    decoder holds the encoder, so the same tensors appear under two names, and torch.save stores a shared
    tensor once. Copying each name on its own (clone, or .cpu() of a CUDA tensor) would store them twice
    and more (the default model's checkpoint was 3.3x its parameters)."""
    copies: dict[tuple, torch.Tensor] = {}
    shared = {}
    for name, tensor in weights.items():
        tensor = tensor.detach()
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)
        if view not in copies:
            copies[view] = tensor.cpu()
        shared[name] = copies[view]
    return shared


def write_model_folder(out_dir: str | Path, plans: dict, dataset_json: dict,
                       fold_weights: Mapping[str | int, Mapping[str, torch.Tensor]],
                       configuration: str = "3d_fullres", trainer_name: str = "nnUNetTrainer",
                       checkpoint_name: str = "checkpoint_final.pth",
                       mirror_axes: tuple[int, ...] = (0, 1, 2)) -> Path:
    """Write the folder; each fold's checkpoint holds the keys nnU-Net's predictor reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (out_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    for fold, weights in fold_weights.items():
        fold_dir = out_dir / fold_dir_name(fold)
        fold_dir.mkdir(exist_ok=True)
        checkpoint = {
            "network_weights": shared_cpu_weights(weights),
            "trainer_name": trainer_name,
            "inference_allowed_mirroring_axes": tuple(mirror_axes),
            "init_args": {"plans": plans, "configuration": configuration,
                          "fold": fold if fold == "all" else int(fold),
                          "dataset_json": dataset_json},
            "current_epoch": 0,
        }
        with atomic_path(fold_dir / checkpoint_name) as written:
            torch.save(checkpoint, written)
    return out_dir


def write_random_model_folder(out_dir: str | Path, plans: dict, dataset_json: dict, seed: int = 0,
                              folds: Sequence[str | int] = ("all",)) -> Path:
    """A model folder whose networks, built from `plans` as the engine builds them, keep their random
    initialisation (seeded: seed + the fold's position): for timing, memory and tests, where the masks do
    not matter."""
    write_model_folder(out_dir, plans, dataset_json, {})
    config = read_model_config(out_dir)
    weights = {}
    for position, fold in enumerate(folds):
        torch.manual_seed(seed + position)
        weights[fold] = build_network(config).state_dict()
    return write_model_folder(out_dir, plans, dataset_json, weights)
