"""Fast inference for nnU-Net v2 lesion-segmentation models on CT.

    from inference import load_model, predict_image
    model = load_model("models/default")
    mask = predict_image(sitk.ReadImage("case_0000.nii.gz"), model)
"""
from .errors import CaseError, ModelError
from .model import LoadedModel, load_model
from .pipeline import PredictionSettings, predict_array, predict_image

__all__ = ["CaseError", "ModelError", "LoadedModel", "PredictionSettings", "load_model",
           "predict_array", "predict_image"]
