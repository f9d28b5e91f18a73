"""Fast inference for nnU-Net v2 lesion-segmentation models on CT.

    from inference import load_model, predict_image
    model = load_model("models/default")
    mask = predict_image(sitk.ReadImage("case_0000.nii.gz"), model)

The names below are imported on first use, so that `inference.io` and `inference.errors` (file checks the
evaluation harness shares) can be imported without torch.
"""
import importlib

__version__ = "0.23.0"  # in every mask's provenance note (provenance.py): a new engine writes masks anew

_EXPORTS = {"CaseError": ".errors", "ModelError": ".errors", "LoadedModel": ".model", "load_model": ".model",
            "PredictionSettings": ".settings", "RunOptions": ".settings", "predict_array": ".pipeline",
            "predict_image": ".pipeline", "predict_image_with_report": ".pipeline", "CaseReport": ".timing"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")
