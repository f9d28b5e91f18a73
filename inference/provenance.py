"""What produced a mask, written into it: the run's fingerprint (the model folder's content, the settings that
change a mask, the backend and device asked for, the engine's version) and the input's. `--skip-existing` and a
resumed `--ray` run keep a mask only where this run would write the same one (io.reusable_mask_problem); anything
else is computed again.

Not in the run's fingerprint: choices the engine makes per machine and case within the same request, namely the
patch that fits the GPU's memory budget and the larger step a `--time-budget` takes on a slow machine; a mask made
under `--backend auto --device auto` on one machine is kept by a rerun of the same command on another.

The input's fingerprint is taken before the input is read. For a gzipped file it is the size, the modification time
and the first and last MiB of its bytes (gzip's trailer holds the CRC-32 of every byte inside); any other file is
hashed whole (SHA-256, remembered by file identity: flare_common/digests.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

from flare_common.digests import file_digest

from . import __version__
from .settings import PredictionSettings

NOTE_PREFIX = "flare-lesion"
EDGE_BYTES = 1 << 20


def run_fingerprint(model_fingerprint: str, settings: PredictionSettings, backend: str, device: str) -> str:
    """16 hex digits naming the model content, every prediction setting (each changes the mask), the backend and
    device asked for (--backend, --device: "auto" too) and the engine version."""
    named = sorted((f.name, repr(getattr(settings, f.name))) for f in fields(settings))
    text = "\n".join([__version__, model_fingerprint, f"backend={backend}", f"device={device}",
                      *(f"{name}={value}" for name, value in named)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_fingerprint(path: Path) -> str:
    """16 hex digits naming the input file's content (see module doc). OSError where it cannot be read."""
    path = Path(path)
    if not path.name.lower().endswith(".gz"):
        return file_digest(path)[:16]
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as file:
        digest.update(file.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            file.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            digest.update(file.read(EDGE_BYTES))
    return digest.hexdigest()[:16]


def mask_note(run: str | None, source: Path | None = None, source_fingerprint: str | None = None) -> str | None:
    """The note a mask of `source` (or of the input whose fingerprint is `source_fingerprint`) made by run `run`
    carries, at most 80 bytes (a NIfTI header's `descrip`); None without a run. OSError where `source` cannot
    be read."""
    if run is None:
        return None
    return f"{NOTE_PREFIX} run={run} input={source_fingerprint or input_fingerprint(source)}"
