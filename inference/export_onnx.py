"""Export a trained model folder's network to ONNX, for `python -m inference --backend onnx|tensorrt`.

    python -m inference.export_onnx -m MODEL_DIR [-o model.onnx] [-f FOLD ...] [-chk NAME] [--opset 17]
                                    [--patch-size Z Y X] [--fp16]

The network is the one the torch backend runs: `inference.model.load_model` (plans -> network ->
checkpoint weights), exported in fp32 on the CPU with the TorchScript-based exporter (the U-Net has no
data-dependent control flow, and the torch.export-based exporter would need `onnxscript`). Batch and the
three spatial axes are dynamic, so any patch that is a multiple of the network's total stride runs;
`--patch-size` fixes them instead (then inference must use exactly that patch).

Without -o every selected fold is written to MODEL_DIR/fold_X/model.onnx, where `--backend onnx` looks.
`--fp16` also writes fold_X/model_fp16.onnx (weights, inputs and outputs in float16), the file the CUDA
execution provider runs; without it the loader converts model.onnx at load time (needs the `onnx` package).

Each file is checked with `onnx.checker` and by running ONNX Runtime (CPU) and torch on the same random
patch; the maximum absolute difference of the logits is printed, and a file that disagrees by more than
--tolerance is not written. Files are written into a hidden folder beside their place first, then renamed (flare_common.files.atomic_path).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from flare_common.files import atomic_path

from .errors import ModelError
from .model.loader import available_folds, fold_dir_name, load_model, network_on_meta, select_folds
from .model.onnx_loader import (FINGERPRINT_KEY, FP16_FILE_NAME, INPUT_NAME, ONNX_FILE_NAME, OUTPUT_NAME,
                                PLANS_FINGERPRINT_KEY, export_cache_path, export_fingerprint, float16_model,
                                dynamic_spatial_axes, stale_export_reason)
from .model.plans import ModelConfig, read_model_config

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["export_fold", "export_for_cpu_where_missing", "main"]

DEFAULT_OPSET = 17  # supported by onnxruntime(-gpu) >= 1.14 and TensorRT 8.6 / 10
MIN_OPSET = 13
try:  # the TorchScript-based exporter stops at a lower opset than torch.export's
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET
except ImportError:
    MAX_OPSET = 20
log = logging.getLogger("inference")


@dataclass
class ExportResult:
    path: Path
    fp16_path: Path | None
    max_abs_diff: float
    verify_shape: tuple[int, ...]
    fp16_max_abs_diff: float | None = None  # float16 model (run by ORT on the CPU) vs torch fp32


def default_output_path(model_dir: str | Path, fold: str, fp16: bool = False) -> Path:
    return Path(model_dir) / fold_dir_name(fold) / (FP16_FILE_NAME if fp16 else ONNX_FILE_NAME)


def check_patch_size(config: ModelConfig, patch_size: Sequence[int]) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    stride = config.total_stride
    if len(patch) != len(stride) or any(p <= 0 or p % s for p, s in zip(patch, stride)):
        raise ModelError(f"{config.model_dir}: --patch-size {'x'.join(map(str, patch))} must be a "
                         f"positive multiple of the network stride {'x'.join(map(str, stride))}")
    return patch


def export_network(module: torch.nn.Module, config: ModelConfig, path: Path, opset: int,
                   patch_size: Sequence[int] | None, metadata: dict) -> None:
    """Trace `module` (fp32, CPU) into `path`; dynamic batch and spatial axes unless `patch_size`."""
    import onnx

    example_patch = tuple(patch_size or config.patch_size)
    example = torch.zeros((1, config.num_input_channels, *example_patch))
    dynamic_axes = None
    if patch_size is None:
        axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
        dynamic_axes = {INPUT_NAME: axes, OUTPUT_NAME: axes}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of torch.export (which needs onnxscript), and
        # warns that InstanceNorm exports with input statistics: exactly nnU-Net's InstanceNorm.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {key: str(value) for key, value in metadata.items()})
    onnx.save(model, str(path))


def check_onnx_file(path: Path, reported_as: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        first_line = str(err).splitlines()[0] if str(err) else "invalid model"
        raise ModelError(f"{reported_as}: onnx.checker rejects the export ({first_line})") from None


def max_abs_diff_vs_torch(onnx_source: str | bytes, module: torch.nn.Module,
                          patch: torch.Tensor) -> float:
    """Max |ORT(CPU) - torch| of the logits on `patch` [1, C, z, y, x] (torch in fp32; the ONNX model
    in its own input type)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(onnx_source, options, providers=["CPUExecutionProvider"])
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    onnx_logits = session.run([OUTPUT_NAME], {INPUT_NAME: patch.numpy().astype(dtype)})[0]
    with torch.no_grad():
        torch_logits = module(patch).numpy()
    if onnx_logits.shape != torch_logits.shape:
        return float("inf")
    return float(np.abs(onnx_logits.astype(np.float64) - torch_logits).max())


def export_fold(model_dir: str | Path, fold: str, output: str | Path | None = None,
                checkpoint_name: str = "checkpoint_final.pth", opset: int = DEFAULT_OPSET,
                patch_size: Sequence[int] | None = None, fp16: bool = False,
                configuration: str | None = None, tolerance: float = 1e-3,
                seed: int = 0) -> ExportResult:
    """Export one fold; verify with onnx.checker and ORT-vs-torch on a random patch; write atomically."""
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"{model_dir}: --opset {opset} is not supported (use {MIN_OPSET}..{MAX_OPSET})")
    model = load_model(model_dir, [fold], checkpoint_name, "cpu", configuration, backend="torch")
    config, module = model.config, model.networks[0].module
    patch = check_patch_size(config, patch_size) if patch_size else None
    path = Path(output) if output else default_output_path(config.model_dir, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "flare.fold": fold,
        "flare.checkpoint": checkpoint_name,
        FINGERPRINT_KEY: export_fingerprint(config, fold, checkpoint_name),
        PLANS_FINGERPRINT_KEY: export_fingerprint(config, fold, checkpoint_name, with_checkpoint=False),
        "flare.configuration": config.configuration,
        "flare.num_classes": config.num_classes,
        "flare.num_input_channels": config.num_input_channels,
        "flare.total_stride": ",".join(map(str, config.total_stride)),
        "flare.training_patch_size": ",".join(map(str, config.patch_size)),
        "flare.patch_size": ",".join(map(str, patch)) if patch else "dynamic",
        "flare.mirror_axes": ",".join(map(str, model.mirror_axes)),
        "flare.precision": "fp32",
        "flare.torch_version": torch.__version__,
    }
    verify_shape = (1, config.num_input_channels, *(patch or config.patch_size))
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(verify_shape, generator=generator)
    fp16_path, fp16_diff = None, None
    if fp16:
        fp16_path = (path.with_name(path.stem + "_fp16" + path.suffix) if output
                     else default_output_path(config.model_dir, fold, fp16=True))
    # both files are renamed into place only once both are checked (the float16 one first: model.onnx, which the
    # loaders look for, last)
    with atomic_path(path) as written:
        try:
            export_network(module, config, written, opset, patch, metadata)
        except (RuntimeError, ValueError, torch.onnx.errors.OnnxExporterError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelError(f"{path}: ONNX export failed (opset {opset}): {message}") from None
        check_onnx_file(written, path)
        diff = max_abs_diff_vs_torch(str(written), module, example)
        if not diff <= tolerance:
            raise ModelError(f"{path}: ONNX Runtime and torch disagree on a random patch "
                             f"(max abs diff {diff:.3g} > {tolerance:g}); file not written")
        if fp16_path is not None:
            with atomic_path(fp16_path) as written_fp16:
                onnx.save(float16_model(onnx.load(str(written))), str(written_fp16))
                check_onnx_file(written_fp16, fp16_path)
                fp16_diff = max_abs_diff_vs_torch(str(written_fp16), module, example)
    if fp16_path is None and not output and default_output_path(config.model_dir, fold, fp16=True).exists():
        # a float16 file from an earlier export would no longer match model.onnx
        stale = default_output_path(config.model_dir, fold, fp16=True)
        stale.unlink()
        log.info("removed %s (from an earlier export; re-export with --fp16 to remake it)", stale)
    return ExportResult(path, fp16_path, diff, verify_shape, fp16_diff)


def can_export() -> bool:
    """Whether onnx and onnxruntime, which an export needs (it is checked against torch in ONNX Runtime), are here."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_for_cpu_where_missing(model_dir: str | Path, folds: Sequence[str] | None = None,
                                 checkpoint_name: str = "checkpoint_final.pth", configuration: str | None = None
                                 ) -> None:
    """`--backend auto` on the CPU, before the model is loaded: each fold without a current export that takes any
    patch (the folder's own fold_X/model.onnx, else this machine's cache: onnx_loader.export_cache_path) is exported
    into the cache, once, said in a line before it starts and one when it is done. Nothing where onnx or
    onnxruntime is missing, where there is no cache (FLARE_CACHE_DIR=off) or no checkpoint to export: the loader
    then runs torch. A failed export is a warning, and torch runs; plans no network can be built from are a
    ModelError, as the loader's."""
    if not can_export():
        return
    config = read_model_config(model_dir, configuration)
    network_on_meta(config)  # plans no network can be built from: refused (ModelError) here, not as a failed export
    for fold in select_folds(config.model_dir, folds):
        if not (config.model_dir / fold_dir_name(fold) / checkpoint_name).is_file():
            return
        cached = export_cache_path(export_fingerprint(config, fold, checkpoint_name))
        folder_export = config.model_dir / fold_dir_name(fold) / ONNX_FILE_NAME
        if cached is None or any(export_is_current(path, config, fold, checkpoint_name)
                                 for path in (folder_export, cached)):
            continue  # nowhere to keep one, or a current one is there
        log.info("exporting fold %s of %s for ONNX Runtime on the CPU, once for this machine (--backend torch "
                 "skips it)", fold, config.model_dir)
        started = time.perf_counter()
        try:
            export_fold(config.model_dir, fold, output=cached, checkpoint_name=checkpoint_name,
                        configuration=config.configuration)
        except (ModelError, OSError) as err:
            log.warning("warning: %s: no ONNX export for the CPU (%s); running torch", config.model_dir, err)
            return
        log.info("exported fold %s to %s for ONNX Runtime on the CPU (once, %.1f s)", fold, cached,
                 time.perf_counter() - started)


def export_is_current(path: Path, config: ModelConfig, fold: str, checkpoint_name: str) -> bool:
    """Whether the export at `path` takes any patch and was made from the fold's current content (read from the file,
    without opening a session: the loader opens it and checks it again)."""
    import onnx

    if not path.is_file():
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable (onnx raises its own types, and protobuf's): exported again into the cache
        return False
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    return dynamic_spatial_axes(model) and stale_export_reason(metadata, config, fold, checkpoint_name) is None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.export_onnx",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, help="nnU-Net v2 model folder")
    parser.add_argument("-o", "--output", default=None,
                        help="output .onnx file (one fold only; default: MODEL_DIR/fold_X/model.onnx)")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to export (default: every fold_* folder)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("-c", "--configuration", default=None,
                        help="plans configuration (default: from the folder name, else 3d_fullres)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="fix the input to this patch instead of dynamic spatial axes")
    parser.add_argument("--fp16", action="store_true",
                        help="also write the float16 variant model_fp16.onnx (for CUDA)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest accepted ORT-vs-torch max abs logits difference")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model_dir = Path(args.model)
    try:
        folds = [str(f) for f in args.folds] if args.folds else available_folds(model_dir)
        if not model_dir.is_dir():
            raise ModelError(f"{model_dir}: model folder not found")
        if not folds:
            raise ModelError(f"{model_dir}: no fold_* folders")
        if args.output and len(folds) != 1:
            raise ModelError(f"{model_dir}: -o names one file; pick one fold with -f "
                             f"(have: {', '.join(folds)})")
        for fold in folds:
            result = export_fold(model_dir, fold, args.output, args.checkpoint, args.opset,
                                 args.patch_size, args.fp16, args.configuration, args.tolerance)
            size_mb = result.path.stat().st_size / 2 ** 20
            print(f"fold {fold}: wrote {result.path} ({size_mb:.1f} MB, opset {args.opset}, "
                  f"{'patch ' + 'x'.join(map(str, args.patch_size)) if args.patch_size else 'dynamic axes'})"
                  f"; onnx.checker ok; ORT vs torch max abs diff {result.max_abs_diff:.3g} on a random "
                  f"{'x'.join(map(str, result.verify_shape))} patch")
            if result.fp16_path is not None:
                print(f"fold {fold}: wrote {result.fp16_path} (float16; onnx.checker ok; ORT CPU vs "
                      f"torch fp32 max abs diff {result.fp16_max_abs_diff:.3g})")
    except (ModelError, ValueError, OSError) as err:
        log.error("error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
