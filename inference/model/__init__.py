"""Model loading, separate from running: plans -> config, checkpoint -> weights, network -> callable."""
from .calibration import CALIBRATION_FILE, read_records
from .checkpoint import load_checkpoint
from .fingerprint import model_fingerprint
from .loader import LoadedModel, fold_dir_name, load_model
from .network import build_network
from .plans import ModelConfig, read_model_config

__all__ = ["CALIBRATION_FILE", "LoadedModel", "ModelConfig", "build_network", "fold_dir_name", "load_checkpoint",
           "load_model", "model_fingerprint", "read_model_config", "read_records"]
