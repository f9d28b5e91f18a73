"""Read an nnU-Net v2 model folder's plans.json and dataset.json into one flat ModelConfig.

Both plans formats are understood: the `architecture` block of nnU-Net >= 2.3.1 and the older
`UNet_class_name` keys. Configurations may `inherits_from` another one (shallow update, as nnU-Net).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ModelError
from ..settings import PATCH_SCALE

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


def scaled_patch(training_patch: Sequence[int], total_stride: Sequence[int], scale: float = PATCH_SCALE
                 ) -> tuple[int, ...]:
    """The training patch x `scale`, rounded up to the network's total stride (never below the training patch): the
    inference patch before the volume's size caps it (network_plan.py decides the patch; this is its arithmetic)."""
    return tuple(max(train, int(math.ceil(train * scale / stride) * stride))
                 for train, stride in zip(training_patch, total_stride))


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def field(mapping: dict, key: str, kind: type, source: Path, where: str = "", default=None, required=True):
    """`mapping[key]` checked to be of `kind` (ModelError naming the file and the key's path otherwise).
    Lists of numbers are checked for that too, with `kind=(list, int)` or `(list, float)`."""
    name = f"{where}.{key}" if where else key
    if key not in mapping:
        if required:
            raise ModelError(f"{source}: '{name}' is missing")
        return default
    value = mapping[key]
    outer, inner = kind if isinstance(kind, tuple) else (kind, None)
    numeric = (int, float) if outer is float else outer
    if not isinstance(value, numeric) or isinstance(value, bool):
        raise ModelError(f"{source}: '{name}' must be {_KINDS[outer]}, got {type(value).__name__}")
    if inner is not None:
        allowed = (int, float) if inner is float else inner
        if not value or any(not isinstance(v, allowed) or isinstance(v, bool) for v in value):
            raise ModelError(f"{source}: '{name}' must be a non-empty list of {_KINDS[inner][3:]}s")
    return value


def resolve_configuration(plans: dict, name: str, plans_path: Path) -> dict:
    """Return configuration `name` with its `inherits_from` chain applied (parent first)."""
    configurations = field(plans, "configurations", dict, plans_path)
    chain, current = [], name
    while current is not None:
        if current not in configurations:
            raise ModelError(f"{plans_path}: configuration '{current}' not found "
                             f"(have: {', '.join(configurations) or 'none'})")
        if current in chain:
            raise ModelError(f"{plans_path}: configuration '{name}' has an inherits_from cycle")
        chain.append(current)
        entry = field(configurations, current, dict, plans_path, "configurations")
        current = field(entry, "inherits_from", str, plans_path, f"configurations.{current}", required=False)
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


def model_folders_below(folder: Path, depth: int = 4, most: int = 8) -> list[Path]:
    """Folders under `folder` (at most `depth` levels down) that hold a plans.json: where a user who named a parent
    (`-m models`, an nnUNet_results folder) meant to point. At most `most`, sorted."""
    found: list[Path] = []
    for level in range(1, depth + 1):
        found += sorted(path.parent for path in folder.glob("/".join(["*"] * level) + "/plans.json"))
    return found[:most]


def read_model_config(model_dir: str | Path, configuration: str | None = None) -> ModelConfig:
    """Parse plans.json + dataset.json of an nnU-Net v2 model folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model folder not found")
    plans_path, dataset_path = model_dir / "plans.json", model_dir / "dataset.json"
    if not plans_path.exists() and not plans_path.is_symlink():
        below = model_folders_below(model_dir)
        raise ModelError(f"{model_dir}: not an nnU-Net model folder (no plans.json)"
                         + (f"; model folders below it: {', '.join(map(str, below))}" if below else ""))
    plans, dataset = read_json(plans_path), read_json(dataset_path)
    if configuration is None:
        configuration = _configuration_from_folder_name(model_dir, plans)
    config = resolve_configuration(plans, configuration, plans_path)
    where = f"configurations.{configuration}"
    spacing = field(config, "spacing", (list, float), plans_path, where)
    patch_size = field(config, "patch_size", (list, int), plans_path, where)
    if len(spacing) != len(patch_size) or min(spacing) <= 0 or min(patch_size) <= 0:
        raise ModelError(f"{plans_path}: '{where}.spacing' and '.patch_size' must be positive and of one length")
    if "architecture" in config:
        arch = field(config, "architecture", dict, plans_path, where)
        class_name = field(arch, "network_class_name", str, plans_path, f"{where}.architecture")
        kwargs = dict(field(arch, "arch_kwargs", dict, plans_path, f"{where}.architecture"))
        requires_import = tuple(field(arch, "_kw_requires_import", (list, str), plans_path,
                                      f"{where}.architecture", default=[], required=False))
        field(kwargs, "strides", list, plans_path, f"{where}.architecture.arch_kwargs")
    elif "UNet_class_name" in config:
        try:
            class_name, kwargs, requires_import = architecture_from_old_plans(config, plans_path)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{plans_path}: '{where}' is not a valid old-format configuration "
                             f"({type(err).__name__}: {err})") from None
    else:
        raise ModelError(f"{plans_path}: configuration '{configuration}' has neither "
                         "'architecture' nor 'UNet_class_name'")
    labels = field(dataset, "labels", dict, dataset_path)
    if not labels or any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise ModelError(f"{dataset_path}: 'labels' must map names to integers "
                         "(region-based models are not supported)")
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not channels or not isinstance(channels, dict):
        raise ModelError(f"{dataset_path}: 'channel_names' must be a non-empty object")
    schemes = field(config, "normalization_schemes", (list, str), plans_path, where,
                    default=["CTNormalization"], required=False)
    properties = field(plans, "foreground_intensity_properties_per_channel", dict, plans_path, default={},
                       required=False)
    props = field(properties, "0", dict, plans_path, "foreground_intensity_properties_per_channel",
                  default={}, required=False)
    if schemes[0] == "CTNormalization":
        for key in ("mean", "std", "percentile_00_5", "percentile_99_5"):
            field(props, key, float, plans_path, "foreground_intensity_properties_per_channel.0")
    dim = len(patch_size)
    transposes = {}
    for key in ("transpose_forward", "transpose_backward"):
        transposes[key] = tuple(field(plans, key, (list, int), plans_path, default=list(range(dim)), required=False))
        if sorted(transposes[key]) != list(range(dim)):
            raise ModelError(f"{plans_path}: '{key}' must be a permutation of 0..{dim - 1}")
    file_ending = field(dataset, "file_ending", str, dataset_path, default=".nii.gz", required=False)
    return ModelConfig(
        model_dir=model_dir,
        configuration=configuration,
        spacing=tuple(float(s) for s in spacing),
        patch_size=tuple(int(p) for p in patch_size),
        transpose_forward=transposes["transpose_forward"],
        transpose_backward=transposes["transpose_backward"],
        normalization_scheme=schemes[0],
        intensity_properties=props,
        num_input_channels=len(channels),
        labels={str(k): int(v) for k, v in labels.items()},
        network_class_name=class_name,
        arch_kwargs=kwargs,
        kw_requires_import=requires_import,
        file_ending=file_ending,
    )


def _configuration_from_folder_name(model_dir: Path, plans: dict) -> str:
    """`Trainer__Plans__3d_fullres` folders name their configuration; otherwise prefer 3d_fullres."""
    parts = model_dir.resolve().name.split("__")
    configurations = field(plans, "configurations", dict, model_dir / "plans.json")
    if len(parts) == 3 and parts[2] in configurations:
        return parts[2]
    if "3d_fullres" in configurations:
        return "3d_fullres"
    three_d = [name for name, c in configurations.items()
               if isinstance(c, dict) and isinstance(c.get("patch_size"), list) and len(c["patch_size"]) == 3]
    if len(three_d) == 1:
        return three_d[0]
    raise ModelError(f"{model_dir / 'plans.json'}: cannot tell which configuration to use "
                     f"(have: {', '.join(configurations)}); pass one explicitly")
