"""Load nnU-Net checkpoints without letting them run code.

nnU-Net itself calls `torch.load(weights_only=False)`, which unpickles arbitrary objects: a checkpoint
could execute anything. We load with `weights_only=True` and allow-list only the few non-tensor globals
real nnU-Net checkpoints contain (NumPy scalars in the training log, torch.device in init_args).

For a GPU the file is memory-mapped rather than read (`mmap`): a training checkpoint also holds the
optimizer's state (SGD momentum, as large as the weights) and the training log, which inference never
touches, so those pages are never read, and the weights' pages are read once, as they are copied to the
device; the mapping goes with the checkpoint dict. On the CPU the weights would stay pages of the file
(which a trainer overwriting it in place would change under the running model), so the file is read.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError


def _allowed_globals() -> list:
    allowed = [np.dtype, np.ndarray, torch.device]
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core
    allowed += [core.multiarray.scalar, core.multiarray._reconstruct]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Return the checkpoint dict; refuse anything that would need arbitrary code to unpickle. `mmap`: map
    the file instead of reading it, where it can be (torch's zip format, a file system that maps)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        checkpoint = read_checkpoint(path, mmap=mmap and zipfile.is_zipfile(path))
    except ModelError:
        if not mmap:
            raise
        checkpoint = read_checkpoint(path, mmap=False)  # cannot be mapped here: read (a refusal stays one)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def read_checkpoint(path: Path, mmap: bool) -> object:
    """torch.load with weights only and nnU-Net's globals allowed; ModelError naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... depending on the file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path}: refused or unreadable checkpoint ({first_line})") from None
