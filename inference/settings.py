"""Every setting of the engine, in one leaf module (it imports nothing of the engine, so that every module may import
it): what a case is predicted with (PredictionSettings), how a run is carried out (RunOptions, built from the
command line by cli.py and by nothing below it), and the process environment the engine reads (Environment: the
only place the engine reads it, but for the cache's location, which flare_common.digests.cache_root reads for the
engine and the tooling alike; docs/settings.md lists every variable, predict.sh's too).

Both records are frozen: a setting is what it was when the run started; a variant is made with
`dataclasses.replace`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flare_common.digests import cache_root

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["CROP_MODES", "ENVIRONMENT_VARIABLES", "Environment", "PATCH_SCALE", "PredictionSettings", "RunOptions",
           "read_environment"]

# The inference patch as a multiple of the training patch where nothing else is known: 1.0, nnU-Net's tiling. A larger
# patch (fewer windows) is a departure a model's calibration record must show costs it nothing (calibrate.py).
PATCH_SCALE = 1.0
MAX_PATCH_SCALE = 8.0
CROP_MODES = ("exact", "box", "none")


@dataclass(frozen=True)
class PredictionSettings:
    """What a case's mask is computed with. Every field is in the run's fingerprint (provenance.run_fingerprint): a mask
    made under other settings is never reused."""

    # step_size and patch_scale: nnU-Net's where a model folder's calibration record (inference.json) says nothing;
    # the command line and predict_image take the record's (network_plan.calibrated_settings)
    step_size: float = 0.5
    patch_size: tuple[int, int, int] | None = None  # None: training patch x patch_scale (network_plan.py)
    patch_scale: float = PATCH_SCALE
    tta: bool = False
    # "exact": the whole volume tiled as without a crop, only the windows that meet the body's box run (the uncropped
    # mask inside the box); "box": the box cut out and tiled on its own (fewer windows, not the same mask: a departure
    # calibration must show costs nothing); "none": every window. pipeline.py, crop.py
    crop: str = "exact"
    crop_threshold_hu: float = -500.0
    crop_margin_mm: float = 10.0
    lesion_labels: tuple[int, ...] | None = None  # None: every non-background label
    resample_back: str = "logits"  # "logits" (trilinear, then argmax) or "labels" (argmax, nearest)
    min_lesion_ml: float | None = None  # None: the model's lesion_filter.json (see lesion_filter.py)
    min_lesion_probability: float | None = None
    gpu_memory_budget_mb: float = 4096.0  # whole-device peak the inference patch must respect (FLARE)
    # Bounds on a case's grid at the model's spacing (pipeline.check_model_grid): a whole-body CT at 1 mm is
    # ~10^8.5 voxels; 2^28 (~268 M) leaves room and refuses a header in the wrong unit before it allocates terabytes.
    max_model_voxels: int = 2 ** 28
    max_upsampling: float = 64.0  # 4x per axis: 12 mm voxels to a 3 mm model; 60 mm voxels are refused
    # Seconds a case may take, its read included: when the network is predicted to overrun what is left, a larger
    # step is taken (network_plan.step_for_time_budget). None: no budget.
    time_budget_s: float | None = None

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, not {self.crop!r}")


@dataclass(frozen=True)
class RunOptions:
    """How a run of the command line is carried out: where cases and masks are, which model, what happens to a failed
    case, and where the cases run. The command line's flags other than PredictionSettings'."""

    input: Path
    output: Path
    model: Path
    folds: tuple[str, ...] | None = None  # None: 'all' if present, else every fold_N
    checkpoint: str = "checkpoint_final.pth"
    configuration: str | None = None
    device: str = "auto"
    backend: str | None = "auto"  # None (no --backend): the model's calibration record's, else "auto" (cli.run)
    precision: str | None = None  # on CUDA with torch, fp16 or fp32; None: the model's CUDA record's, else fp16
    on_error: str = "fail"  # "fail": no mask; "empty": an all-zero mask on the input's grid
    output_format: str = "nifti"  # "nifti": <case>.nii.gz; "dicom-seg": <case>.dcm, a DICOM SEG (DICOM input only)
    save_probabilities: bool = False  # also <output>/probabilities/<case>.nii.gz, the lesion probability x255 (uint8)
    timings: Path | None = None
    report: Path | None = None  # the run report (--report): also what --timings holds
    skip_existing: bool = False
    ray_address: str | None = None  # None: no Ray; "": Ray on this machine; else the cluster's address
    ray_cpus: int = 1
    ray_workers: int | None = None
    journal: Path | None = None
    sequential: bool = False
    quiet: bool = False
    verbose: bool = False

    @property
    def on_ray(self) -> bool:
        return self.ray_address is not None


# name -> (what it does, the module that uses the value). predict.sh's are read by the shell, the others here only.
ENVIRONMENT_VARIABLES = {
    "INPUT_DIR": ("predict.sh: the folder of <case>_0000.nii.gz images (default /workspace/inputs)", "predict.sh"),
    "OUTPUT_DIR": ("predict.sh: the folder for <case>.nii.gz masks (default /workspace/outputs)", "predict.sh"),
    "MODEL_DIR": ("predict.sh: the model folder (default models/default)", "predict.sh"),
    "DEVICE": ("predict.sh: --device (auto|cuda|cpu)", "predict.sh"),
    "BACKEND": ("predict.sh: --backend (auto|torch|onnx|tensorrt)", "predict.sh"),
    "TIMINGS_JSON": ("predict.sh: --timings, the stage timings file, outside the outputs folder", "predict.sh"),
    "PYTHON": ("predict.sh: the interpreter (default .venv/bin/python, else python3)", "predict.sh"),
    "PREDICT_ARGS": ("predict.sh: more flags of `python -m inference`, split into words", "predict.sh"),
    "FLARE_CACHE_DIR": ("where the engine keeps what it may reuse (CPU exports of models); `off`: nothing is kept "
                        "(the image sets it)", "flare_common/digests.py (cache_root: shared with the tooling)"),
    "XDG_CACHE_HOME": ("the cache's parent where FLARE_CACHE_DIR is unset (default ~/.cache)",
                       "flare_common/digests.py (cache_root)"),
    "FLARE_ONNX_CACHE": ("the folder for CPU exports instead of FLARE_CACHE_DIR/onnx",
                         "model/onnx_loader.py, export_onnx.py"),
    "FLARE_ONNX_PRECISION": ("`fp32`: run model.onnx in fp32 on CUDA instead of its float16 variant",
                             "model/onnx_loader.py"),
    "FLARE_TRT_CACHE_DIR": ("TensorRT engine and timing caches' root (default: fold_X/trt_cache)",
                            "model/onnx_loader.py"),
    "OMP_NUM_THREADS": ("cores a Ray worker's torch uses (Ray sets it from --ray-cpus)", "scale_out.py"),
    "RAY_AUTH_MODE": ("`token`: the cluster asks for a token (then RAY_AUTH_TOKEN); only named in an error line",
                      "scale_out.py"),
    "PYTORCH_CUDA_ALLOC_CONF": ("set by the command line to expandable_segments:True unless already set",
                                "cli.py"),
}


@dataclass(frozen=True)
class Environment:
    """The process environment as the engine reads it (ENVIRONMENT_VARIABLES), taken once by `read_environment`."""

    onnx_cache: str | None = None
    onnx_precision: str = "fp16"
    trt_cache_dir: str | None = None
    omp_num_threads: int | None = None
    ray_auth_mode: str | None = None

    def onnx_cache_root(self) -> Path | None:
        """Where `--backend auto` keeps its CPU exports: $FLARE_ONNX_CACHE, else the cache root's onnx/; None where
        nothing may be kept."""
        if self.onnx_cache:
            return Path(self.onnx_cache)
        root = cache_root()
        return root / "onnx" if root is not None else None


def read_environment() -> Environment:
    """The engine's environment variables as they are now."""
    get = os.environ.get
    threads = get("OMP_NUM_THREADS", "")
    return Environment(onnx_cache=get("FLARE_ONNX_CACHE"), onnx_precision=get("FLARE_ONNX_PRECISION", "fp16").lower(),
                       trt_cache_dir=get("FLARE_TRT_CACHE_DIR"),
                       omp_num_threads=max(1, int(threads)) if threads.isdigit() else None,
                       ray_auth_mode=get("RAY_AUTH_MODE"))


def prefer_expandable_segments() -> None:
    """Before CUDA starts: torch's allocator with expandable segments, unless PYTORCH_CUDA_ALLOC_CONF says otherwise.
    Without it the caching allocator's reserve ran 1.53x the allocated peak on a 192^3 ResEnc-L window, with it
    1.26x (results/gpu_forward_memory.md), and the whole device is what counts."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

