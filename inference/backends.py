"""Ways to run the network on one patch. Each is a callable: patch [1, C, z, y, x] -> logits [1, K, z, y, x].

The sliding window, cropping and resampling are shared; only this step differs between backends.
"""
from __future__ import annotations

import contextlib

import torch


class TorchNetwork:
    """A PyTorch module in eval mode; fp16 autocast on CUDA, fp32 on CPU."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.module = module.to(device).eval()

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.module(patch.to(self.device, non_blocking=True))
