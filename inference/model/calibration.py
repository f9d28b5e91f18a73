"""A model folder's calibration records (inference.json, written by `python -m inference.calibrate`): per kind of
device (cpu, cuda), the speed settings measured on this model to cost no accuracy against nnU-Net's own (the training
patch, step 0.5, torch in fp32), the evidence, and the fingerprint of the model they were measured on. Read as
untrusted data: known keys of known types, in range; anything else is refused in one line.

The file holds {"records": {"cpu": RECORD, "cuda": RECORD}}; a file written before engine 0.23 is one RECORD
(its "device" says which). A run uses the record of its own kind of device; where there is none, another's tiling
(the patch, the step and the crop do not depend on the device), and its line says so.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..settings import CROP_MODES, MAX_PATCH_SCALE

CALIBRATION_FILE = "inference.json"
BACKENDS = ("auto", "torch")
DEVICE_KINDS = ("cpu", "cuda")
PRECISIONS = ("fp16", "fp32")  # on CUDA with torch: fp16 autocast (nnU-Net's own) or fp32; the CPU runs fp32


@dataclass(frozen=True)
class Calibration:
    """What calibration chose (the settings it may set: `settings`, and the CPU backend), and for which model."""

    patch_scale: float
    step_size: float
    backend: str  # on the CPU: "auto" (ONNX Runtime where an export can be had) or "torch"
    model_fingerprint: str  # LoadedModel.fingerprint() of the model it was measured on
    source: Path
    crop: str = "exact"  # records of engines before 0.22 hold none: theirs measured the exact crop
    device: str = "cpu"  # the kind of device it was measured on
    precision: str = "fp32"  # what the network ran in: on CUDA fp16 (autocast) or fp32; on the CPU fp32

    @property
    def settings(self) -> dict:
        """The PredictionSettings fields it sets."""
        return {"patch_scale": self.patch_scale, "step_size": self.step_size, "crop": self.crop}


def read_records(path: Path) -> dict[str, dict]:
    """The records of a calibration file by kind of device, as stored (checked by read_calibration). ValueError where
    the file is not a calibration file; OSError where it cannot be read."""
    stored = json.loads(path.read_text())
    if isinstance(stored, dict) and isinstance(stored.get("records"), dict):
        records = stored["records"]
    elif isinstance(stored, dict) and isinstance(stored.get("chosen"), dict):  # before engine 0.23: one record
        records = {str(stored.get("device", "cpu")): stored}
    else:
        raise ValueError("expected a JSON object with a 'records' object")
    unknown = sorted(set(records) - set(DEVICE_KINDS))
    if unknown or not records:
        raise ValueError(f"records for {', '.join(DEVICE_KINDS)} only, not {', '.join(unknown) or 'none'}")
    return records


def read_calibration(model_dir: str | Path, device_kind: str = "cpu") -> Calibration | None:
    """The folder's record for `device_kind` (cpu, cuda), else its other kind's (Calibration.device says which), None
    where there is no inference.json. ModelError (one line) where it is not a valid one."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        records = read_records(path)
        kind = device_kind if device_kind in records else next(k for k in DEVICE_KINDS if k in records)
        record = records[kind]
        if not isinstance(record, dict) or not isinstance(record.get("chosen"), dict):
            raise ValueError(f"the {kind} record: expected a JSON object with a 'chosen' object")
        chosen = record["chosen"]
        calibration = Calibration(float(chosen["patch_scale"]), float(chosen["step_size"]), str(chosen["backend"]),
                                  str(record["model_fingerprint"]), path, str(chosen.get("crop", "exact")), kind,
                                  str(chosen.get("precision", "fp16" if kind == "cuda" else "fp32")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelError(f"{path}: not a valid calibration record ({err})") from None
    if not (1 <= calibration.patch_scale <= MAX_PATCH_SCALE and 0 < calibration.step_size <= 1
            and math.isfinite(calibration.patch_scale) and calibration.backend in BACKENDS
            and calibration.crop in CROP_MODES and calibration.precision in PRECISIONS):
        raise ModelError(f"{path}: patch_scale must be in [1, {MAX_PATCH_SCALE:g}], step_size in (0, 1], backend "
                         f"one of {', '.join(BACKENDS)}, crop one of {', '.join(CROP_MODES)} and precision one of "
                         f"{', '.join(PRECISIONS)}")
    if kind == "cpu" and calibration.precision != "fp32":
        raise ModelError(f"{path}: the cpu record's precision must be fp32 (the CPU runs fp32)")
    return calibration


def recorded_precision(calibration: Calibration | None, fingerprint: str | None, device_kind: str) -> str | None:
    """The precision a cuda record chose for the model of `fingerprint`, where the run is on CUDA; else None."""
    if device_kind == "cuda" and calibration is not None and calibration.device == "cuda" \
            and calibration.model_fingerprint == fingerprint:
        return calibration.precision
    return None


def check_precision(precision: str | None, device_kind: str, backend: str | None) -> None:
    """ValueError (one line) where `precision` (--precision) cannot be had: fp16 on the CPU, or any on CUDA's ONNX
    backends (they compute in their export's precision: FLARE_ONNX_PRECISION)."""
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device_kind != "cuda" and precision == "fp16":
        raise ValueError("--precision fp16: on CUDA only (the CPU computes in fp32)")
    if device_kind == "cuda" and backend in ("onnx", "tensorrt"):
        raise ValueError(f"--precision: for torch on CUDA; --backend {backend} computes in its export's precision "
                         "(FLARE_ONNX_PRECISION)")
