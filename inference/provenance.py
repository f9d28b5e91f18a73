"""What produced a mask, written into it: the run's fingerprint (the model folder's content, the settings that
change a mask, the engine's version) and the input's. `--skip-existing` and a resumed `--ray` run keep a mask
only where this run would write the same one (io.reusable_mask_problem); anything else is computed again.

The device and backend are not part of it: fp16 on a GPU and fp32 on the CPU give the same model's answer,
within rounding. The input's fingerprint is its size, modification time and the first and last MiB of its bytes
(a .nii.gz ends with the CRC-32 of all its voxels), not a hash of the whole file, which would cost a read of
every input on every rerun.
"""
from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

from . import __version__

NOTE_PREFIX = "flare-lesion"
EDGE_BYTES = 1 << 20
# Settings that never change a mask: how the run is shown.
NOT_IN_FINGERPRINT = {"progress"}


def run_fingerprint(model_fingerprint: str, settings) -> str | None:
    """16 hex digits naming the model content, the mask-changing settings and the engine version; None where a
    setting cannot be named (a crop function, extra options): such a run's masks are never reused."""
    if settings.crop_function is not None or settings.extra:
        return None
    named = sorted((f.name, repr(getattr(settings, f.name))) for f in fields(settings)
                   if f.name not in NOT_IN_FINGERPRINT | {"crop_function", "extra"})
    text = "\n".join([__version__, model_fingerprint, *(f"{name}={value}" for name, value in named)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_fingerprint(path: Path) -> str:
    """16 hex digits from the input file's size, modification time and first and last MiB (see module doc)."""
    stat = Path(path).stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as file:
        digest.update(file.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            file.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            digest.update(file.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def mask_note(run: str | None, source: Path) -> str | None:
    """The note a mask of `source` made by run `run` carries (at most 80 bytes: a NIfTI header's `descrip`)."""
    return None if run is None else f"{NOTE_PREFIX} run={run} input={input_fingerprint(source)}"
