"""Ways to run the network on one patch, and what every way must say of itself (PatchNetwork): a callable
patch [1, C, z, y, x] -> logits [1, K, z, y, x] that names the patches it takes, how many it runs best at once,
and whether it can move to another device.

The sliding window, cropping and resampling are shared; only this step differs between backends. Which patch a case
is run with is decided in network_plan.py, from what the networks say here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from .errors import ModelError


# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["OnnxRuntimeNetwork", "PatchNetwork", "PatchRange", "TorchNetwork"]


@dataclass(frozen=True)
class PatchRange:
    """The patches a network takes: every patch between `smallest` and `largest` axis by axis (None: no bound on
    that side), of multiples of the network's stride (the plans' rule, checked apart)."""

    smallest: tuple[int, ...] | None = None
    largest: tuple[int, ...] | None = None

    @property
    def fixed(self) -> tuple[int, ...] | None:
        """The one patch taken, where there is only one."""
        return self.smallest if self.smallest is not None and self.smallest == self.largest else None

    def accepts(self, patch: Sequence[int]) -> bool:
        return (self.smallest is None or all(p >= lo for p, lo in zip(patch, self.smallest))) and \
            (self.largest is None or all(p <= hi for p, hi in zip(patch, self.largest)))

    def intersection(self, other: "PatchRange") -> "PatchRange":
        def bound(a, b, pick):
            return b if a is None else a if b is None else tuple(map(pick, a, b))

        return PatchRange(bound(self.smallest, other.smallest, max), bound(self.largest, other.largest, min))

    def describe(self) -> str:
        def shown(patch):
            return "x".join(map(str, patch))

        if self.fixed is not None:
            return f"only {shown(self.fixed)}"
        if self.smallest is None and self.largest is None:
            return "any multiple of the stride"
        return f"from {shown(self.smallest) if self.smallest else 'any'} to {shown(self.largest) if self.largest else 'any'}"


class PatchNetwork(Protocol):
    """What the engine asks of a way to run the network (TorchNetwork, OnnxRuntimeNetwork)."""

    source: Path | str  # what it was loaded from, named in messages
    lanes: int  # windows it runs best at once (the sliding window runs that many on threads)
    movable: bool  # whether `on` can move it to another device (the last resort after the GPU ran out of memory)

    def __call__(self, patch: torch.Tensor) -> torch.Tensor: ...

    def accepted_patches(self) -> PatchRange: ...

    def on(self, device: torch.device) -> "PatchNetwork": ...


class TorchNetwork:
    """A PyTorch module in eval mode; on CUDA fp16 autocast (nnU-Net's own) unless `fp16` is False, fp32 on the CPU.
    Takes any patch of the stride's multiples."""

    lanes = 1
    movable = True

    def __init__(self, module: torch.nn.Module, device: torch.device, source: Path | str = "the torch network",
                 fp16: bool = True):
        self.device = device
        self.source = source
        self.fp16 = fp16
        self.module = module.to(device).eval()

    def accepted_patches(self) -> PatchRange:
        return PatchRange()

    def on(self, device: torch.device) -> "TorchNetwork":
        """The same module moved (in place) to `device`."""
        return TorchNetwork(self.module, device, self.source, self.fp16)

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        on_cuda_fp16 = self.device.type == "cuda" and self.fp16
        autocast = torch.autocast("cuda", dtype=torch.float16) if on_cuda_fp16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            patch = patch.to(self.device, non_blocking=True)
            # without autocast the weights are fp32: so must the input be (a volume on a GPU may be held in fp16)
            return self.module(patch if on_cuda_fp16 else patch.float())


_ORT_TYPES = {"tensor(float)": (torch.float32, np.float32), "tensor(float16)": (torch.float16, np.float16)}


class OnnxRuntimeNetwork:
    """An ONNX Runtime session (see inference.model.onnx_loader), as a patch -> logits callable.

    On CUDA (CUDA or TensorRT execution provider) the patch and the logits stay on the GPU: ONNX Runtime
    reads and writes torch tensors in place through io_binding. On the CPU: numpy in, numpy out.
    `device` is where the caller's tensors live; the logits are returned there, in the model's dtype.
    `lanes`: how many calls it serves best at once (the session is thread-safe). Its patches: the one an export
    was fixed to (export_onnx --patch-size), or a TensorRT engine's profile (`patch_range`), else any.
    """

    movable = False  # a session lives on its provider's device

    def __init__(self, session, device: torch.device, source=None, mirror_axes=(0, 1, 2),
                 patch_range=None, lanes: int = 1):
        self.session = session
        self.lanes = lanes
        self.device = device
        self.source = source
        self.mirror_axes = tuple(mirror_axes)
        self.patch_range = patch_range  # (smallest, largest) patch the TensorRT engine accepts
        self.provider = session.get_providers()[0]
        model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
        self.input_name, self.output_name = model_input.name, model_output.name
        self.input_dtype, self.input_numpy_dtype = _ORT_TYPES[model_input.type]
        self.output_dtype, self.output_numpy_dtype = _ORT_TYPES[model_output.type]
        self.num_classes = model_output.shape[1]
        spatial = model_input.shape[2:]
        self.fixed_patch = tuple(spatial) if all(isinstance(d, int) for d in spatial) else None
        self.on_gpu = self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    @property
    def precision(self) -> str:
        """What the session computes in: TensorRT builds its engine in fp16 (onnx_loader.open_fold); otherwise the
        model's own type, fp32 where no float16 model could be had (no `onnx` package to convert one)."""
        return "fp16" if self.provider == "TensorrtExecutionProvider" or self.input_dtype == torch.float16 else "fp32"

    def accepted_patches(self) -> PatchRange:
        if self.fixed_patch is not None:
            return PatchRange(self.fixed_patch, self.fixed_patch)
        return PatchRange(*self.patch_range) if self.patch_range is not None else PatchRange()

    def on(self, device: torch.device) -> "OnnxRuntimeNetwork":
        raise ModelError(f"{self.source}: an ONNX Runtime session cannot move to {device}")

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        if not self.accepted_patches().accepts(patch.shape[2:]):  # network_plan.check_request refuses it first
            raise ModelError(f"{self.source}: the {'x'.join(map(str, patch.shape[2:]))} patch is not one it takes "
                             f"({self.accepted_patches().describe()})")
        if self.on_gpu:
            return self.run_bound(patch)
        array = patch.detach().to("cpu", self.input_dtype).contiguous().numpy()
        logits = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(logits).to(self.device)

    def run_bound(self, patch: torch.Tensor) -> torch.Tensor:
        """Run with io_binding on torch tensors of `self.device` (no copies; used on CUDA)."""
        patch = patch.detach().to(self.device, self.input_dtype).contiguous()
        logits = torch.empty((patch.shape[0], self.num_classes, *patch.shape[2:]),
                             dtype=self.output_dtype, device=self.device)
        device_type = self.device.type
        device_id = self.device.index or 0
        if device_type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, device_type, device_id, self.input_numpy_dtype,
                           tuple(patch.shape), patch.data_ptr())
        binding.bind_output(self.output_name, device_type, device_id, self.output_numpy_dtype,
                            tuple(logits.shape), logits.data_ptr())
        if device_type == "cuda":
            # ONNX Runtime works on its own stream: torch's pending writes to `patch` must land first;
            # run_with_iobinding returns after ONNX Runtime's stream is synchronised: `logits` is ready.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return logits
