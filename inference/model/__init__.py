"""Model loading, separate from running: plans -> config, checkpoint -> weights, network -> callable."""
from .loader import LoadedModel, load_model
from .plans import ModelConfig, read_model_config

__all__ = ["LoadedModel", "ModelConfig", "load_model", "read_model_config"]
