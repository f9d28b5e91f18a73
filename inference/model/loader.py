"""Load a trained nnU-Net v2 model folder into something the pipeline can run. Loading only loads: it never writes
(an export for `--backend auto` is made before, by export_onnx.export_for_cpu_where_missing)."""
from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..backends import PatchNetwork, TorchNetwork
from ..errors import ModelError
from ..lesion_filter import LesionFilter, read_lesion_filter
from ..settings import PATCH_SCALE
from .calibration import Calibration, check_precision, read_calibration, recorded_precision
from .checkpoint import load_checkpoint
from .fingerprint import model_fingerprint
from .network import build_network
from .onnx_loader import ONNX_FILE_NAME, current_cpu_networks, load_onnx_networks
from .plans import ModelConfig, read_model_config, scaled_patch

@dataclass
class LoadedModel:
    config: ModelConfig
    networks: list[PatchNetwork]  # one per fold; their logits are summed
    device: torch.device
    folds: tuple[str, ...]
    backend: str = "torch"
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes TTA may flip, from the checkpoint
    lesion_filter: LesionFilter = LesionFilter()  # the folder's lesion_filter.json; default keeps all
    content: Future | None = field(default=None, repr=False)  # the model folder's fingerprint, being hashed
    calibration: Calibration | None = None  # the folder's inference.json record for this device (model/calibration.py)
    precision: str = "fp32"  # what the networks compute in: on CUDA fp16 (torch's autocast, ONNX's float16) or fp32

    def fingerprint(self) -> str:
        """The content hash of what defines this model's masks (fingerprint.model_fingerprint): plans, dataset,
        each fold's weights, the lesion filter. ModelError where a file cannot be read."""
        if self.content is None:
            raise ModelError(f"{self.config.model_dir}: loaded without its fingerprint")
        try:
            return self.content.result()
        except OSError as err:
            raise ModelError(f"{err.filename or self.config.model_dir}: cannot be read to fingerprint the model "
                             f"({err.strerror or err})") from None


# The fingerprint is hashed beside the load (a thread: hashlib releases the GIL): a 781 MB checkpoint's 0.52 s,
# where its digest is not remembered, added 0.16 s to its load of 0.58 s on the 2-core CPU, the wait for it after
# the load included (results/fingerprint_*.md).
_HASHING = ThreadPoolExecutor(1, thread_name_prefix="fingerprint")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available")
    return device


def available_folds(model_dir: Path) -> list[str]:
    """Folds present as fold_N / fold_all, 'all' first, then numeric order."""
    found = [p.name[len("fold_"):] for p in model_dir.glob("fold_*") if p.is_dir()]
    return sorted(found, key=lambda f: (f != "all", int(f) if f.isdigit() else 0, f))


def select_folds(model_dir: Path, folds: Sequence[str | int] | None) -> list[str]:
    present = available_folds(model_dir)
    if folds is None or len(folds) == 0:
        if not present:
            raise ModelError(f"{model_dir}: no fold_* folders")
        return ["all"] if "all" in present else present
    chosen = [str(f) for f in folds]
    missing = [f for f in chosen if f not in present]
    if missing:
        raise ModelError(f"{model_dir}: fold(s) {', '.join(missing)} not found "
                         f"(have: {', '.join(present) or 'none'})")
    return chosen


def load_model(model_dir: str | Path, folds: Sequence[str | int] | None = None,
               checkpoint_name: str = "checkpoint_final.pth", device: str | torch.device = "auto",
               configuration: str | None = None, backend: str = "torch",
               largest_patch: tuple[int, ...] | None = None, precision: str | None = None) -> LoadedModel:
    """Read plans, build the network and load each selected fold's weights onto `device`.

    backend: "torch"; "onnx" / "tensorrt" (an export made by inference.export_onnx); "auto" (the CLI's
    default): torch on CUDA, ONNX Runtime on the CPU where there is a current export of these checkpoints
    (onnx_loader.current_cpu_networks; export_onnx.export_for_cpu_where_missing makes one), else torch.
    largest_patch: the largest patch a TensorRT engine is built for (network_plan.largest_patch; default the
    default run's: the calibrated patch, else the training patch).
    precision: what torch computes in on CUDA, "fp16" (autocast, nnU-Net's own) or "fp32"; None: the folder's CUDA
    calibration record's where it was measured on these very weights, else fp16. The CPU computes in fp32."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir, configuration)
    device = resolve_device(device)
    check_precision(precision, device.type, backend)
    fold_names = select_folds(model_dir, folds)
    weights = fold_weight_files(model_dir, fold_names, checkpoint_name, backend)
    lesion_filter = read_lesion_filter(model_dir)
    calibration = read_calibration(model_dir, device.type)
    content = _HASHING.submit(model_fingerprint, model_dir, config.configuration, weights)
    if backend == "auto":  # torch (fp16) on CUDA; ONNX Runtime on the CPU where an export is or can be had
        if device.type == "cpu":
            network_on_meta(config)  # plans no network can be built from: refused here, before any export is looked for
        networks = current_cpu_networks(config, fold_names, checkpoint_name) if device.type == "cpu" else None
        if networks:
            return LoadedModel(config, networks, device, tuple(fold_names), "onnx", networks[0].mirror_axes,
                               lesion_filter, content, calibration, "fp32")
        backend = "torch"
    if backend != "torch":
        if largest_patch is None:  # the default run's: the calibrated patch, else the training patch
            largest_patch = scaled_patch(config.patch_size, config.total_stride,
                                         calibration.patch_scale if calibration else PATCH_SCALE)
        networks = load_onnx_networks(config, fold_names, device, backend, checkpoint_name, largest_patch)
        mirror_axes = networks[0].mirror_axes  # kept in the export's metadata
        return LoadedModel(config, networks, device, tuple(fold_names), backend, mirror_axes, lesion_filter, content,
                           calibration, networks[0].precision)
    networks, mirror_axes = [], (0, 1, 2)
    for fold in fold_names:
        checkpoint_path = model_dir / f"fold_{fold}" / checkpoint_name
        # mapped for a GPU only: on the CPU the weights would stay pages of the file (checkpoint.py)
        checkpoint = load_checkpoint(checkpoint_path, mmap=device.type == "cuda")
        network = network_with_weights(config, checkpoint["network_weights"], checkpoint_path)
        mirror_axes = tuple(checkpoint.get("inference_allowed_mirroring_axes") or mirror_axes)
        networks.append(TorchNetwork(network, device, checkpoint_path))
    if device.type == "cuda":  # decided once the weights are loaded, their fingerprint hashed beside the load
        precision = precision or recorded_precision(calibration, content_or_none(content), "cuda") or "fp16"
        for network in networks:
            network.fp16 = precision == "fp16"
    return LoadedModel(config, networks, device, tuple(fold_names), backend, mirror_axes, lesion_filter, content,
                       calibration, precision if device.type == "cuda" else "fp32")


def content_or_none(content: Future) -> str | None:
    """The fingerprint being hashed, None where a file could not be read (LoadedModel.fingerprint then says which)."""
    try:
        return content.result()
    except OSError:
        return None


def fold_weight_files(model_dir: Path, fold_names: Sequence[str], checkpoint_name: str,
                      backend: str) -> list[tuple[str, Path]]:
    """Each fold and the file its weights come from: the checkpoint, or for the ONNX backends the export where
    there is no checkpoint. ModelError naming the first missing one, before anything is loaded."""
    files = []
    for fold in fold_names:
        fold_dir = model_dir / fold_dir_name(fold)
        checkpoint = fold_dir / checkpoint_name
        if backend in ("onnx", "tensorrt") and not checkpoint.is_file():
            checkpoint = fold_dir / ONNX_FILE_NAME
            if not checkpoint.is_file():
                raise ModelError(f"{checkpoint}: not found; export the model first with "
                                 f"`python -m inference.export_onnx -m {model_dir}`")
        elif not checkpoint.is_file():
            present = sorted(p.name for p in fold_dir.glob("*.pth"))
            raise ModelError(f"{checkpoint}: checkpoint not found (-chk; {fold_dir.name} has "
                             f"{', '.join(present) or 'no .pth file'})")
        files.append((fold, checkpoint))
    return files


def network_with_weights(config, weights: dict, checkpoint_path: Path) -> torch.nn.Module:
    """The planned network holding the checkpoint's `weights` (fp32).

    Built on the meta device, then given the checkpoint's tensors themselves (load_state_dict assign): a
    network built the usual way first fills every parameter with random numbers that are overwritten at once,
    a second or more of CPU time for a 100 M-parameter network, and then copies the weights over them."""
    network = network_on_meta(config)
    assign = network is not None
    network = network if assign else build_network(config)
    try:
        network.load_state_dict(weights, assign=assign)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise ModelError(f"{checkpoint_path}: weights do not fit the planned network ({first_line})") from None
    if assign and any(tensor.is_meta for tensor in [*network.parameters(), *network.buffers()]):
        # a buffer the checkpoint does not hold (not persistent) has no value yet: the usual way (weights fit)
        network = build_network(config)
        network.load_state_dict(weights)
    return network.float()


def network_on_meta(config) -> torch.nn.Module | None:
    """The planned network without storage (the meta device); None where its construction needs real
    tensors (then it is built the usual way)."""
    try:
        with torch.device("meta"):
            return build_network(config)
    except ModelError:
        raise
    except Exception:
        return None


def fold_dir_name(fold: str | int) -> str:
    fold = str(fold)
    if not re.fullmatch(r"all|\d+", fold):
        raise ValueError(f"invalid fold '{fold}'")
    return f"fold_{fold}"
