"""A model folder's calibration record (inference.json, written by `python -m inference.calibrate`): the speed
settings measured on this model to cost no accuracy against nnU-Net's own (the training patch, step 0.5, torch), the
evidence, and the fingerprint of the model it was measured on. Read as untrusted data: known keys of known types,
in range; anything else is refused in one line.
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


@dataclass(frozen=True)
class Calibration:
    """What calibration chose (the settings it may set: `settings`, and the CPU backend), and for which model."""

    patch_scale: float
    step_size: float
    backend: str  # on the CPU: "auto" (ONNX Runtime where an export can be had) or "torch"
    model_fingerprint: str  # LoadedModel.fingerprint() of the model it was measured on
    source: Path
    crop: str = "exact"  # records of engines before 0.22 hold none: theirs measured the exact crop

    @property
    def settings(self) -> dict:
        """The PredictionSettings fields it sets."""
        return {"patch_scale": self.patch_scale, "step_size": self.step_size, "crop": self.crop}


def read_calibration(model_dir: str | Path) -> Calibration | None:
    """The folder's inference.json, None where there is none. ModelError (one line) where it is not a valid one."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("chosen"), dict):
            raise ValueError("expected a JSON object with a 'chosen' object")
        chosen = record["chosen"]
        calibration = Calibration(float(chosen["patch_scale"]), float(chosen["step_size"]), str(chosen["backend"]),
                                  str(record["model_fingerprint"]), path, str(chosen.get("crop", "exact")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelError(f"{path}: not a valid calibration record ({err})") from None
    if not (1 <= calibration.patch_scale <= MAX_PATCH_SCALE and 0 < calibration.step_size <= 1
            and math.isfinite(calibration.patch_scale) and calibration.backend in BACKENDS
            and calibration.crop in CROP_MODES):
        raise ModelError(f"{path}: patch_scale must be in [1, {MAX_PATCH_SCALE:g}], step_size in (0, 1], backend "
                         f"one of {', '.join(BACKENDS)} and crop one of {', '.join(CROP_MODES)}")
    return calibration
