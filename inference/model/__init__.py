"""Model loading, separate from running: plans -> config, checkpoint -> weights, network -> callable."""
from .fingerprint import model_fingerprint
from .loader import LoadedModel, fold_dir_name, load_model
from .network import build_network
from .plans import ModelConfig, read_model_config

__all__ = ["LoadedModel", "ModelConfig", "build_network", "fold_dir_name", "load_model", "model_fingerprint",
           "read_model_config"]
