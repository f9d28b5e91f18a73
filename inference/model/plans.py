"""Read an nnU-Net v2 model folder's plans.json and dataset.json into one flat ModelConfig.

Both plans formats are understood: the `architecture` block of nnU-Net >= 2.3.1 and the older
`UNet_class_name` keys. Configurations may `inherits_from` another one (shallow update, as nnU-Net).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

_OLD_FORMAT_NETWORKS = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}


@dataclass
class ModelConfig:
    """Everything inference needs to know about a trained model, independent of its weights."""

    model_dir: Path
    configuration: str
    spacing: tuple[float, ...]  # (z, y, x) after transpose_forward, mm
    patch_size: tuple[int, ...]  # training patch, (z, y, x) after transpose_forward
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    normalization_scheme: str
    intensity_properties: dict  # foreground_intensity_properties_per_channel["0"]
    num_input_channels: int
    labels: dict  # name -> int, as in dataset.json
    network_class_name: str
    arch_kwargs: dict
    kw_requires_import: tuple[str, ...] = ()
    file_ending: str = ".nii.gz"
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel at the model's spacing, in ml."""
        return math.prod(self.spacing) / 1000

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the pooling strides per axis: an inference patch must be a multiple of it."""
        strides = self.arch_kwargs["strides"]
        total = [1] * len(self.patch_size)
        for stage in strides:
            stage = [stage] * len(total) if isinstance(stage, int) else stage
            total = [t * s for t, s in zip(total, stage)]
        return tuple(total)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None


def resolve_configuration(plans: dict, name: str, plans_path: Path) -> dict:
    """Return configuration `name` with its `inherits_from` chain applied (parent first)."""
    configurations = plans.get("configurations", {})
    chain, current = [], name
    while current is not None:
        if current not in configurations:
            raise ModelError(f"{plans_path}: configuration '{current}' not found "
                             f"(have: {', '.join(configurations) or 'none'})")
        if current in chain:
            raise ModelError(f"{plans_path}: configuration '{name}' has an inherits_from cycle")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    resolved: dict = {}
    for config_name in reversed(chain):
        resolved.update(configurations[config_name])
    return resolved


def architecture_from_old_plans(config: dict, plans_path: Path) -> tuple[str, dict, tuple[str, ...]]:
    """Translate the pre-2.3.1 `UNet_class_name` keys into network class name and kwargs."""
    class_name = config["UNet_class_name"]
    if class_name not in _OLD_FORMAT_NETWORKS:
        raise ModelError(f"{plans_path}: unsupported UNet_class_name '{class_name}'")
    n_stages = len(config["conv_kernel_sizes"])
    dim = len(config["patch_size"])
    features = [min(config["UNet_base_num_features"] * 2 ** i, config["unet_max_num_features"])
                for i in range(n_stages)]
    blocks_key = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": features,
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": config["conv_kernel_sizes"],
        "strides": config["pool_op_kernel_sizes"],
        blocks_key: config["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return _OLD_FORMAT_NETWORKS[class_name], kwargs, ("conv_op", "norm_op", "dropout_op", "nonlin")


def read_model_config(model_dir: str | Path, configuration: str | None = None) -> ModelConfig:
    """Parse plans.json + dataset.json of an nnU-Net v2 model folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model folder not found")
    plans_path, dataset_path = model_dir / "plans.json", model_dir / "dataset.json"
    plans, dataset = read_json(plans_path), read_json(dataset_path)
    if configuration is None:
        configuration = _configuration_from_folder_name(model_dir, plans)
    config = resolve_configuration(plans, configuration, plans_path)
    if "architecture" in config:
        arch = config["architecture"]
        class_name, kwargs = arch["network_class_name"], dict(arch["arch_kwargs"])
        requires_import = tuple(arch.get("_kw_requires_import", ()))
    elif "UNet_class_name" in config:
        class_name, kwargs, requires_import = architecture_from_old_plans(config, plans_path)
    else:
        raise ModelError(f"{plans_path}: configuration '{configuration}' has neither "
                         "'architecture' nor 'UNet_class_name'")
    labels = dataset.get("labels")
    if not labels or any(not isinstance(v, int) for v in labels.values()):
        raise ModelError(f"{dataset_path}: 'labels' must map names to integers "
                         "(region-based models are not supported)")
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not channels:
        raise ModelError(f"{dataset_path}: no 'channel_names'")
    schemes = config.get("normalization_schemes", ["CTNormalization"])
    props = plans.get("foreground_intensity_properties_per_channel", {}).get("0", {})
    dim = len(config["patch_size"])
    return ModelConfig(
        model_dir=model_dir,
        configuration=configuration,
        spacing=tuple(float(s) for s in config["spacing"]),
        patch_size=tuple(int(p) for p in config["patch_size"]),
        transpose_forward=tuple(plans.get("transpose_forward", range(dim))),
        transpose_backward=tuple(plans.get("transpose_backward", range(dim))),
        normalization_scheme=schemes[0],
        intensity_properties=props,
        num_input_channels=len(channels),
        labels={str(k): int(v) for k, v in labels.items()},
        network_class_name=class_name,
        arch_kwargs=kwargs,
        kw_requires_import=requires_import,
        file_ending=dataset.get("file_ending", ".nii.gz"),
    )


def _configuration_from_folder_name(model_dir: Path, plans: dict) -> str:
    """`Trainer__Plans__3d_fullres` folders name their configuration; otherwise prefer 3d_fullres."""
    parts = model_dir.resolve().name.split("__")
    configurations = plans.get("configurations", {})
    if len(parts) == 3 and parts[2] in configurations:
        return parts[2]
    if "3d_fullres" in configurations:
        return "3d_fullres"
    three_d = [name for name, c in configurations.items() if len(c.get("patch_size", ())) == 3]
    if len(three_d) == 1:
        return three_d[0]
    raise ModelError(f"{model_dir / 'plans.json'}: cannot tell which configuration to use "
                     f"(have: {', '.join(configurations)}); pass one explicitly")
