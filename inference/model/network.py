"""Build the network a ModelConfig describes, with dynamic-network-architectures."""
from __future__ import annotations

import importlib

import torch

from ..errors import ModelError
from .plans import ModelConfig

# Plans name classes by dotted path; importing an arbitrary path would let a plans.json run code.
_ALLOWED_MODULE_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


def import_dotted(name: str, source: str):
    if not name.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ModelError(f"{source}: refusing to import '{name}' (only dynamic_network_architectures "
                         "and torch.nn classes are allowed)")
    module_name, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ModelError(f"{source}: cannot import '{name}'") from None


def build_network(config: ModelConfig) -> torch.nn.Module:
    """Instantiate the (untrained) network, deep supervision off, as nnU-Net does for inference."""
    source = str(config.model_dir / "plans.json")
    kwargs = dict(config.arch_kwargs)
    for key in config.kw_requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = import_dotted(kwargs[key], source)
    network_class = import_dotted(config.network_class_name, source)
    try:
        return network_class(config.num_input_channels, num_classes=config.num_classes,
                             deep_supervision=False, **kwargs)
    except TypeError as err:
        raise ModelError(f"{source}: architecture arguments do not fit "
                         f"{config.network_class_name} ({err})") from None
