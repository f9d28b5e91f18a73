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


def run_fingerprint(model_fingerprint: str, settings: PredictionSettings, backend: str, device: str,
                    precision: str | None = None) -> str:
    """16 hex digits naming the model content, every prediction setting (each changes the mask), the backend, device
    and precision asked for (--backend, --device: "auto" too; --precision: None, the record's or fp16 on CUDA, as the
    machine decides) and the engine version."""
    named = sorted((f.name, repr(getattr(settings, f.name))) for f in fields(settings))
    text = "\n".join([__version__, model_fingerprint, f"backend={backend}", f"device={device}",
                      f"precision={precision or 'auto'}", *(f"{name}={value}" for name, value in named)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_fingerprint(path) -> str:
    """16 hex digits naming the input file's content (see module doc), or a DICOM series' files'
    (dicom_series.DicomSeries.fingerprint). OSError where it cannot be read."""
    if hasattr(path, "fingerprint"):
        return path.fingerprint()
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


def source_commit() -> str | None:
    """The git commit the engine's source is at, "+changes" where tracked files differ from it; None outside a git
    checkout (the image: its source is what the image was built from)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        changed = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def run_environment(device) -> dict:
    """What a run ran on, for its report (an audit trail, a methods section): the engine's version and commit, the
    versions of what computes (Python, torch, ONNX Runtime, SimpleITK, NumPy; CUDA and the driver where a GPU ran)
    and the device's name."""
    import platform

    import numpy
    import SimpleITK as sitk
    import torch

    from flare_common.machine import cpu_model

    try:
        import onnxruntime
        onnxruntime_version = onnxruntime.__version__
    except ImportError:
        onnxruntime_version = None
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    driver = None
    if on_gpu:
        try:
            import pynvml
            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # NVML absent or unusable: the report says null, the run goes on
            driver = None
    return {"engine": __version__, "commit": source_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime_version, "simpleitk": sitk.Version_VersionString(),
            "numpy": numpy.__version__, "cuda": torch.version.cuda if on_gpu else None, "driver": driver,
            "device_name": torch.cuda.get_device_name(device) if on_gpu else cpu_model()}
