"""Build the network a ModelConfig describes, with dynamic-network-architectures."""
from __future__ import annotations

import importlib

import torch

from ..errors import ModelError
from .plans import ModelConfig

# Plans name classes by dotted path, and the network calls what they name (nonlin(**nonlin_kwargs), ...): a
# name that resolved to any callable could run code (an import helper reachable as a module attribute imports
# a module by name). So a name must be a module under these packages, then one attribute of it that is a
# torch.nn.Module subclass defined under them: never a function, a module, a builtin or another class.
_ALLOWED_MODULE_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


def import_network_class(name: str, source: str, key: str) -> type[torch.nn.Module]:
    """The torch.nn.Module subclass `name` ('package.module.Class') names; ModelError naming `source` and
    `key` for anything else."""
    if not isinstance(name, str) or not name.startswith(_ALLOWED_MODULE_PREFIXES):
        raise ModelError(f"{source}: {key}: refusing '{name}' (only torch.nn and dynamic_network_architectures "
                         "network classes are allowed)")
    module_name, _, attr = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ModelError(f"{source}: {key}: cannot import '{name}'") from None
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)
            and found.__module__.startswith(_ALLOWED_MODULE_PREFIXES)):
        raise ModelError(f"{source}: {key}: refusing '{name}' (not a torch.nn.Module class)")
    return found


def build_network(config: ModelConfig) -> torch.nn.Module:
    """Instantiate the (untrained) network, deep supervision off, as nnU-Net does for inference."""
    source = str(config.model_dir / "plans.json")
    kwargs = dict(config.arch_kwargs)
    for key in config.kw_requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = import_network_class(kwargs[key], source, key)
    network_class = import_network_class(config.network_class_name, source, "network_class_name")
    try:
        return network_class(config.num_input_channels, num_classes=config.num_classes,
                             deep_supervision=False, **kwargs)
    except TypeError as err:
        raise ModelError(f"{source}: architecture arguments do not fit "
                         f"{config.network_class_name} ({err})") from None
