"""Load exported ONNX files (fold_X/model.onnx, see inference.export_onnx) into ONNX Runtime sessions.

`--backend onnx`: CUDAExecutionProvider on a GPU, running fold_X/model_fp16.onnx (or model.onnx converted
to float16 at load when that file is absent); CPUExecutionProvider in fp32 on the CPU.
`--backend tensorrt`: TensorrtExecutionProvider (fp16, engine and timing caches in fold_X/trt_cache, or
$FLARE_TRT_CACHE_DIR/<model folder>/fold_X), with CUDAExecutionProvider for anything TensorRT cannot run.
When the requested provider is not available, one warning line, then the next one (finally the CPU).
A TensorRT engine is built for the patches from the training patch up to the largest the run asks for
(network_plan.largest_patch: --patch-size, or the training patch x --patch-scale).

This module opens exports; it never makes one (export_onnx.py does, and `--backend auto` asks it to before loading:
export_onnx.export_for_cpu_where_missing). The environment it follows (FLARE_ONNX_PRECISION, FLARE_TRT_CACHE_DIR,
FLARE_ONNX_CACHE) is read in settings.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..backends import OnnxRuntimeNetwork
from ..errors import ModelError
from ..settings import read_environment
from .fingerprint import network_fingerprint
from .plans import ModelConfig

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["cpu_lanes", "load_onnx_networks", "session_options"]

INPUT_NAME = "patch"
OUTPUT_NAME = "logits"
ONNX_FILE_NAME = "model.onnx"
FP16_FILE_NAME = "model_fp16.onnx"
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
BACKEND_PROVIDERS = {"onnx": (CUDA,), "tensorrt": (TENSORRT, CUDA)}
log = logging.getLogger("inference")


def choose_providers(backend: str, device_type: str,
                     available: Sequence[str]) -> tuple[list[str], str | None]:
    """Execution providers to ask for, best first, always ending with the CPU, and a one-line warning
    when the one `backend` asks for cannot be had on `device_type` with this onnxruntime build."""
    if backend not in BACKEND_PROVIDERS:
        raise ModelError(f"unknown backend '{backend}' (have: torch, {', '.join(BACKEND_PROVIDERS)})")
    wanted = BACKEND_PROVIDERS[backend]
    if device_type != "cuda":
        warning = (f"--backend {backend} needs a CUDA device; running ONNX Runtime on the CPU"
                   if backend == "tensorrt" else None)
        return [CPU], warning
    usable = [p for p in wanted if p in available]
    warning = None
    if wanted[0] not in available:
        fallback = usable[0] if usable else CPU
        warning = (f"{wanted[0]} is not available in this onnxruntime build "
                   f"(have: {', '.join(available)}); using {fallback}")
    return usable + [CPU], warning


def session_options(on_gpu: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: our own warnings say what matters in one line
    # Threads that spin between operators take the cores from whatever else runs: the GPU's feeding, or on the
    # CPU torch's own threads (crop, resampling, export) and the pipeline's reads and writes. On the 2-core CPU
    # 12 phantoms took 31.5 s with spinning and 21.1 s without (results/batch_throughput_*.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not on_gpu:
        # On two cores, a window a core, two at once (cpu_lanes): a 48^3 window is too small to split well,
        # 19.7 ms a window on 2 threads against 17.2 ms for 2 single-threaded windows at once on the 2-core
        # CPU (1.02x at 96^3), with the same logits to the bit (results/onnx_latency.md).
        lanes = cpu_lanes()
        options.intra_op_num_threads = 1 if lanes > 1 else torch.get_num_threads()
        options.inter_op_num_threads = 1
    return options


MAX_CPU_LANES = 2  # each window in flight holds its activations: gigabytes for a large model at a large patch


def cpu_lanes() -> int:
    """Windows an ONNX Runtime CPU session runs at once: one a core where torch may use two cores or one
    (torch.get_num_threads, which a Ray worker or OMP_NUM_THREADS sets), else one window on all of them.

    Concurrent runs of a session share its one intra-op thread pool, so two windows on a pool of N/2 threads
    would keep only about N/2 + 1 cores busy; with one thread a window there is no pool to share. Lanes of
    several threads each would need a session (and a copy of the weights) per lane: not measured, not done."""
    threads = max(1, torch.get_num_threads())
    return threads if threads <= MAX_CPU_LANES else 1


def cuda_provider_options(device: torch.device) -> dict:
    return {
        "device_id": device.index if device.index is not None else torch.cuda.current_device(),
        "arena_extend_strategy": "kSameAsRequested",  # grow the arena by what is needed, not by 2x
        "cudnn_conv_algo_search": "EXHAUSTIVE",  # once per patch shape; the sliding window reuses it
        "do_copy_in_default_stream": "1",
    }


def trt_cache_dir(fold_dir: Path) -> Path:
    """Where TensorRT keeps built engines for this fold (absolute): fold_X/trt_cache, or
    $FLARE_TRT_CACHE_DIR/<model folder>/fold_X; a temp folder (with a warning) if that is not writable."""
    root = read_environment().trt_cache_dir
    fold_dir = fold_dir.resolve()
    cache = Path(root) / fold_dir.parent.name / fold_dir.name if root else fold_dir / "trt_cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    key = hashlib.sha1(str(fold_dir).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / "flare_trt_cache" / key
    fallback.mkdir(parents=True, exist_ok=True)
    log.warning("warning: %s is not writable; TensorRT engines are cached in %s (set FLARE_TRT_CACHE_DIR to keep "
                "them)", cache, fallback)
    return fallback


def trt_profile_shapes(config: ModelConfig, largest: tuple[int, ...]) -> dict[str, str]:
    """One TensorRT optimisation profile covering every window the run may make: from the training patch to
    `largest` (network_plan.largest_patch), optimised for the largest. Outside it TensorRT cannot run the patch
    (OnnxRuntimeNetwork.accepted_patches)."""
    smallest = tuple(min(t, p) for t, p in zip(config.patch_size, largest))

    def shape(patch):
        return f"{INPUT_NAME}:1x{config.num_input_channels}x" + "x".join(map(str, patch))

    return {"trt_profile_min_shapes": shape(smallest), "trt_profile_opt_shapes": shape(largest),
            "trt_profile_max_shapes": shape(largest)}


def has_dynamic_spatial_axes(path: Path) -> bool:
    """Whether the export has dynamic spatial axes (default) or a fixed --patch-size; without the `onnx`
    package, assume the default."""
    try:
        import onnx
    except ImportError:
        return True
    return dynamic_spatial_axes(onnx.load(str(path), load_external_data=False))


def dynamic_spatial_axes(model) -> bool:
    """Whether an onnx.ModelProto's input has a dynamic spatial axis."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return any(not d.HasField("dim_value") for d in dims[2:])


def float16_model(model):
    """onnx.ModelProto in float32 -> the same graph with float16 weights, inputs, outputs and casts.

    Written for the U-Nets of dynamic-network-architectures (Conv, ConvTranspose, InstanceNormalization,
    LeakyRelu, Concat, Add): the operators compute in the type of their inputs.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    for node in graph.node:
        if any(attribute.type in (attribute.GRAPH, attribute.GRAPHS) for attribute in node.attribute):
            raise ModelError(f"node {node.name or node.op_type}: subgraphs are not supported by the "
                             "float16 conversion")
    for initializer in graph.initializer:
        if initializer.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(initializer).astype(np.float16)
            initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
            if attribute.type == attribute.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                array = numpy_helper.to_array(attribute.t).astype(np.float16)
                attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))
    for prop in model.metadata_props:
        if prop.key == "flare.precision":
            prop.value = "fp16"
    return model


def cuda_model_source(path: Path) -> str | bytes:
    """The model the CUDA provider runs: float16 unless FLARE_ONNX_PRECISION=fp32 (see module doc)."""
    if read_environment().onnx_precision == "fp32":
        return str(path)
    fp16_path = path.with_name(FP16_FILE_NAME)
    if fp16_path.is_file():
        return str(fp16_path)
    try:
        import onnx
    except ImportError:
        log.warning("warning: %s missing and no `onnx` package to convert %s; running fp32 on CUDA "
                    "(export with --fp16)", fp16_path, path.name)
        return str(path)
    log.info("%s: converting to float16 at load (export with --fp16 to skip this)", path)
    return float16_model(onnx.load(str(path))).SerializeToString()


def check_session_fits(session, path: Path, config: ModelConfig) -> None:
    """The export must be of this model: 5-D input, the plans' input channels and classes."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 5:
        raise ModelError(f"{path}: expected one 5-D input [batch, channel, z, y, x] and one output; "
                         "not an export of a 3D network (re-run python -m inference.export_onnx)")
    channels, classes = inputs[0].shape[1], outputs[0].shape[1]
    if isinstance(channels, int) and channels != config.num_input_channels:
        raise ModelError(f"{path}: exported for {channels} input channel(s) but the plans have "
                         f"{config.num_input_channels}; re-export it")
    if isinstance(classes, int) and classes != config.num_classes:
        raise ModelError(f"{path}: exported for {classes} classes but dataset.json has "
                         f"{config.num_classes}; re-export it")


def open_fold(path: Path, config: ModelConfig, device: torch.device, providers: list[str],
              largest_patch: tuple[int, ...] | None = None):
    """One fold's session on the best of `providers` that starts, as an OnnxRuntimeNetwork. `largest_patch`: the largest
    patch a TensorRT engine is built for (default the training patch)."""
    import onnxruntime as ort

    main = providers[0]
    options_by_provider = {CPU: {}}
    patch_range = None
    source: str | bytes = str(path)
    if main in (CUDA, TENSORRT):
        options_by_provider[CUDA] = cuda_provider_options(device)
    if main == CUDA:
        source = cuda_model_source(path)
    if main == TENSORRT:
        # fp32 model + TensorRT's own fp16: it keeps the layers that need fp32 (normalisation) in fp32
        cache = str(trt_cache_dir(path.parent))
        options_by_provider[TENSORRT] = {
            "device_id": options_by_provider[CUDA]["device_id"],
            "trt_fp16_enable": "1",
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache,
        }
        if has_dynamic_spatial_axes(path):
            profile = trt_profile_shapes(config, largest_patch or tuple(config.patch_size))
            options_by_provider[TENSORRT].update(profile)
            patch_range = tuple(tuple(int(v) for v in profile[key].split(":")[1].split("x")[2:])
                                for key in ("trt_profile_min_shapes", "trt_profile_max_shapes"))
    try:
        session = ort.InferenceSession(source, session_options(main != CPU),
                                       providers=[(p, options_by_provider[p]) for p in providers])
    except Exception as err:  # onnxruntime raises its own exception types, one per failure kind
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{path}: ONNX Runtime cannot load it ({first_line})") from None
    started = session.get_providers()[0]
    if started != main:
        # compiled in but did not start (missing CUDA / cuDNN / TensorRT libraries): open the session
        # again as the provider that did start wants it (model precision, options)
        log.warning("warning: %s did not start (see the onnxruntime message above); using %s",
                    main, started)
        rest = providers[providers.index(started):] if started in providers else [CPU]
        return open_fold(path, config, device, rest, largest_patch)
    check_session_fits(session, path, config)
    metadata = session.get_modelmeta().custom_metadata_map
    mirror_axes = tuple(int(a) for a in metadata.get("flare.mirror_axes", "0,1,2").split(",") if a)
    return OnnxRuntimeNetwork(session, device, source=path, mirror_axes=mirror_axes,
                              patch_range=patch_range, lanes=cpu_lanes() if started == CPU else 1)


FINGERPRINT_KEY = "flare.network_fingerprint"  # export metadata: what the export was made from (fingerprint.py)
PLANS_FINGERPRINT_KEY = "flare.plans_fingerprint"  # the same without the checkpoint: a folder shipped exports only


def export_fingerprint(config: ModelConfig, fold: str, checkpoint_name: str, with_checkpoint: bool = True) -> str:
    """The fingerprint an export of this fold carries: plans, dataset, configuration, fold and checkpoint (the
    plans' part alone with `with_checkpoint=False`). ModelError where a file cannot be read."""
    checkpoint = config.model_dir / f"fold_{fold}" / checkpoint_name
    try:
        return network_fingerprint(config.model_dir, config.configuration, fold,
                                   checkpoint if with_checkpoint else None)
    except OSError as err:
        raise ModelError(f"{err.filename or checkpoint}: cannot be read to fingerprint the model "
                         f"({err.strerror or err})") from None


def export_metadata(network: OnnxRuntimeNetwork) -> dict:
    """The metadata an opened export carries (export_onnx writes it)."""
    return network.session.get_modelmeta().custom_metadata_map


def stale_export_reason(metadata: dict, config: ModelConfig, fold: str, checkpoint_name: str) -> str | None:
    """Why the export whose metadata is `metadata` (export_metadata) is not the one this fold's content defines, or
    None when it is. A folder with the export and no checkpoint (shipped for ONNX only) is checked against its plans
    and dataset."""
    with_checkpoint = (config.model_dir / f"fold_{fold}" / checkpoint_name).is_file()
    key = FINGERPRINT_KEY if with_checkpoint else PLANS_FINGERPRINT_KEY
    recorded = metadata.get(key)
    if recorded is None:
        return "it carries no fingerprint of what it was exported from (made by an earlier version)"
    if recorded != export_fingerprint(config, fold, checkpoint_name, with_checkpoint):
        made_from = f"another {checkpoint_name}, plans.json or dataset.json" if with_checkpoint else \
            "another plans.json or dataset.json"
        return f"it was exported from {made_from} than the model folder holds now"
    return None


def export_cache_path(fingerprint: str) -> Path | None:
    """Where `--backend auto` keeps its own export of a fold, outside the model folder (which may be read-only,
    or committed): one folder per network content, so that an export is never found for other weights. None
    where there is no cache (FLARE_CACHE_DIR=off, FLARE_ONNX_CACHE unset)."""
    root = read_environment().onnx_cache_root()
    return root / fingerprint[:24] / ONNX_FILE_NAME if root is not None else None


def current_cpu_networks(config: ModelConfig, fold_names: Sequence[str],
                         checkpoint_name: str) -> list[OnnxRuntimeNetwork] | None:
    """`--backend auto` on the CPU: ONNX Runtime networks of exports made from these very checkpoints (1.6x torch on
    the network of a 512x512x554 case, same mask: results/per_case_*.md): the model folder's own export
    (fold_X/model.onnx) where it is current and takes any patch, else this machine's cached one (export_cache_path,
    made before loading by export_onnx.export_for_cpu_where_missing). None where a fold has neither: the caller runs
    torch."""
    try:
        import onnxruntime  # noqa: F401 - only whether it is there
    except ImportError:
        return None
    networks = []
    for fold in fold_names:
        fold_dir = config.model_dir / f"fold_{fold}"
        if not (fold_dir / checkpoint_name).is_file():
            return None  # nothing to check an export against: torch says why
        network = current_export(fold_dir / ONNX_FILE_NAME, config, fold, checkpoint_name, say_why=True)
        if network is None:
            cached = export_cache_path(export_fingerprint(config, fold, checkpoint_name))
            network = current_export(cached, config, fold, checkpoint_name) if cached else None
        if network is None:
            return None
        networks.append(network)
    return networks


def current_export(path: Path, config: ModelConfig, fold: str, checkpoint_name: str,
                   say_why: bool = False) -> OnnxRuntimeNetwork | None:
    """A CPU session of the export at `path` if it exists, opens, takes any patch and was made from this fold's
    current content; else None (`say_why`: with one line saying why it is not used)."""
    if not path.is_file():
        return None
    try:
        network = open_fold(path, config, torch.device("cpu"), [CPU])
    except ModelError as err:  # unreadable or of another model: made again in the cache
        reason = str(err)
    else:
        reason = stale_export_reason(export_metadata(network), config, fold, checkpoint_name)
        if reason is None and network.fixed_patch is not None:
            reason = (f"it takes only the {'x'.join(map(str, network.fixed_patch))} patch it was exported for "
                      "(--patch-size)")
        if reason is None:
            return network
    if say_why:
        log.info("%s not used: %s; using an export of the same checkpoint made for this machine, or torch", path,
                 reason)
    return None


def load_onnx_networks(config: ModelConfig, fold_names: Sequence[str], device: torch.device, backend: str,
                       checkpoint_name: str = "checkpoint_final.pth", largest_patch: tuple[int, ...] | None = None
                       ) -> list[OnnxRuntimeNetwork]:
    """One ONNX Runtime network per fold, from MODEL_DIR/fold_X/model.onnx (see module doc); an export that was not
    made from the fold's current plans and checkpoint (fingerprint.py) is refused. `largest_patch`: see open_fold."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(f"--backend {backend}: onnxruntime is not installed "
                         "(pip install onnxruntime, or onnxruntime-gpu for CUDA)") from None
    providers, warning = choose_providers(backend, device.type, ort.get_available_providers())
    if warning:
        log.warning("warning: %s", warning)
    networks = []
    for fold in fold_names:
        path = config.model_dir / f"fold_{fold}" / ONNX_FILE_NAME
        if not path.is_file():
            cached = export_cache_path(export_fingerprint(config, fold, checkpoint_name))
            elsewhere = (f"; this machine's CPU export of the same checkpoint is {cached} (`--backend auto` uses it)"
                         if cached is not None and cached.is_file() else "")
            raise ModelError(f"{path}: not found; export the model first with "
                             f"`python -m inference.export_onnx -m {config.model_dir}`{elsewhere}")
        network = open_fold(path, config, device, providers, largest_patch)
        reason = stale_export_reason(export_metadata(network), config, fold, checkpoint_name)
        if reason is not None:
            raise ModelError(f"{path}: not used: {reason}; export it again: "
                             f"python -m inference.export_onnx -m {config.model_dir}")
        networks.append(network)
        providers = providers[providers.index(networks[-1].provider):]  # a fallback holds for every fold
    return networks
