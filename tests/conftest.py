"""Shared fixtures: tiny nnU-Net v2 model folders and CT-like synthetic images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from training.model_folder import make_dataset_json, make_plans, plain_unet_arch_kwargs, write_random_model_folder

CT_INTENSITIES = {"mean": 50.0, "std": 150.0, "percentile_00_5": -900.0, "percentile_99_5": 900.0,
                  "median": 40.0, "min": -1000.0, "max": 1500.0}


def make_toy_model(out_dir: Path, folds=("all",), residual: bool = False, seed: int = 0,
                   labels: dict | None = None, patch_size=(32, 32, 32), spacing=(3.0, 3.0, 3.0)) -> Path:
    """A 3-stage U-Net model folder with seeded random weights (one set per fold)."""
    arch = plain_unet_arch_kwargs(n_stages=3, base_features=4, residual=residual)
    plans = make_plans(spacing=list(spacing), patch_size=list(patch_size), arch_kwargs=arch,
                       intensity_properties=CT_INTENSITIES, residual=residual)
    return write_random_model_folder(out_dir, plans, make_dataset_json(labels), seed=seed, folds=folds)


def make_ct_image(shape_zyx=(24, 40, 48), spacing_xyz=(1.5, 1.5, 4.0), origin=(10.0, -20.0, 5.0),
                  direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seed: int = 0) -> sitk.Image:
    """Air around a soft-tissue ellipsoid body holding a bright blob, with noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    array = np.full(shape_zyx, -1000.0)
    array[(y / 0.8) ** 2 + (x / 0.8) ** 2 < 1] = 40.0
    array[(z ** 2 + (y - 0.1) ** 2 + (x + 0.2) ** 2) < 0.1] = 180.0
    array += rng.normal(0, 10, shape_zyx)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


@pytest.fixture
def toy_model_dir(tmp_path) -> Path:
    return make_toy_model(tmp_path / "Dataset001_Toy" / "nnUNetTrainer__nnUNetPlans__3d_fullres")


def write_old_format_plans(model_dir: Path) -> None:
    """Rewrite a model folder's plans.json in the pre-2.3.1 `UNet_class_name` format."""
    plans = json.loads((model_dir / "plans.json").read_text())
    for config in plans["configurations"].values():
        arch = config.pop("architecture")["arch_kwargs"]
        config.update({
            "UNet_class_name": "PlainConvUNet",
            "UNet_base_num_features": arch["features_per_stage"][0],
            "unet_max_num_features": max(arch["features_per_stage"]),
            "n_conv_per_stage_encoder": arch["n_conv_per_stage"],
            "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"],
            "pool_op_kernel_sizes": arch["strides"],
            "conv_kernel_sizes": arch["kernel_sizes"],
            "num_pool_per_axis": [len(arch["strides"]) - 1] * 3,
        })
    (model_dir / "plans.json").write_text(json.dumps(plans))
