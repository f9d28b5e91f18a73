"""Ways to run the network on one patch. Each is a callable: patch [1, C, z, y, x] -> logits [1, K, z, y, x].

The sliding window, cropping and resampling are shared; only this step differs between backends.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


class TorchNetwork:
    """A PyTorch module in eval mode; fp16 autocast on CUDA, fp32 on CPU."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.module = module.to(device).eval()

    def on(self, device: torch.device) -> "TorchNetwork":
        """The same module moved (in place) to `device`: the last resort after the GPU ran out of memory."""
        return TorchNetwork(self.module, device)

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.module(patch.to(self.device, non_blocking=True))


_ORT_TYPES = {"tensor(float)": (torch.float32, np.float32), "tensor(float16)": (torch.float16, np.float16)}


class OnnxRuntimeNetwork:
    """An ONNX Runtime session (see inference.model.onnx_loader), as a patch -> logits callable.

    On CUDA (CUDA or TensorRT execution provider) the patch and the logits stay on the GPU: ONNX Runtime
    reads and writes torch tensors in place through io_binding. On the CPU: numpy in, numpy out.
    `device` is where the caller's tensors live; the logits are returned there, in the model's dtype.
    `lanes`: how many calls it serves best at once (the session is thread-safe; see
    sliding_window.window_lanes).
    """

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

    def check_patch(self, shape) -> None:
        from .errors import ModelError

        patch = tuple(shape[2:])
        if self.fixed_patch is not None and patch != self.fixed_patch:
            raise ModelError(f"{self.source}: exported for the fixed patch "
                             f"{'x'.join(map(str, self.fixed_patch))}, got {'x'.join(map(str, patch))}"
                             "; run with --patch-size "
                             f"{' '.join(map(str, self.fixed_patch))} or export with dynamic axes")
        if self.patch_range is not None:
            smallest, largest = self.patch_range
            if any(p < lo or p > hi for p, lo, hi in zip(patch, smallest, largest)):
                raise ModelError(f"{self.source}: patch {'x'.join(map(str, patch))} is outside the "
                                 f"TensorRT profile {'x'.join(map(str, smallest))} .. "
                                 f"{'x'.join(map(str, largest))} (set FLARE_TRT_MAX_PATCH_SCALE)")

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        self.check_patch(patch.shape)
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
