"""The model a run asks for (RunOptions), made ready and loaded: by the command line, and by each Ray worker.

Readying is the one step that may write: `--backend auto` on the CPU exports the checkpoints for ONNX Runtime where
no current export exists (once, into this machine's cache, said in a line: export_onnx.export_for_cpu_where_missing).
Loading (model/loader.py) only loads.
"""
from __future__ import annotations

from .model import LoadedModel, load_model, read_model_config
from .model.loader import resolve_device
from .network_plan import largest_patch
from .settings import PredictionSettings, RunOptions


def load_for_run(options: RunOptions, settings: PredictionSettings, check_only: bool = False) -> LoadedModel:
    """The model with the run's folds, checkpoint, device and backend. A TensorRT engine is built for the largest
    patch the settings ask for (network_plan.largest_patch). `check_only`: torch on the CPU, nothing made (a --ray
    driver checks the model; its workers load it)."""
    if check_only:
        return load_model(options.model, options.folds, options.checkpoint, "cpu", options.configuration, "torch")
    device = resolve_device(options.device)
    if options.backend == "auto" and device.type == "cpu":
        # imported here: the exporter brings torch.onnx, 20 ms of every start-up that needs no export
        from .export_onnx import export_for_cpu_where_missing

        export_for_cpu_where_missing(options.model, options.folds, options.checkpoint, options.configuration)
    largest = None
    if options.backend == "tensorrt":
        largest = largest_patch(read_model_config(options.model, options.configuration), settings)
    return load_model(options.model, options.folds, options.checkpoint, device, options.configuration,
                      options.backend, largest, options.precision)
