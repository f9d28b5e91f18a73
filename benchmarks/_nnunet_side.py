"""The peer's side of benchmarks/parity_nnunet.py: run nnU-Net v2's own `nnUNetPredictor` on a folder.

Runs inside .venv-nnunet (scripts/setup_nnunet_env.sh), never in the project venv:

    .venv-nnunet/bin/python benchmarks/_nnunet_side.py -i IN -o OUT -m MODEL --timings T.json \
        [-f all] [--resampler plans|torch|torch-input|torch-export] [--threads 1] [--device cpu|cuda]

Each case goes through the same calls, in the same order, as `nnUNetPredictor.predict_from_files_sequential`
(preprocessor.run_case -> predict_logits_from_preprocessed_data -> export_prediction_from_logits), timed
per stage; the model is loaded once, before the clock starts. `--resampler torch` switches the
configuration to nnU-Net's torch resampler with the kwargs of its `*_torchres` planners (trilinear, no
separate z), the resampling our engine uses; `plans` keeps what plans.json says; `torch-input` and
`torch-export` switch only one side, to tell which resampling makes a difference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# nnU-Net reads its thread/process count from the environment at import time.
import torch
import nnunetv2
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

_THREADS = "1"
for i, arg in enumerate(sys.argv):
    if arg == "--threads" and i + 1 < len(sys.argv):
        _THREADS = sys.argv[i + 1]
os.environ.setdefault("nnUNet_def_n_proc", _THREADS)
os.environ.setdefault("nnUNet_raw", "/nonexistent/nnUNet_raw")  # silence the "not defined" warnings
os.environ.setdefault("nnUNet_preprocessed", "/nonexistent/nnUNet_preprocessed")
os.environ.setdefault("nnUNet_results", "/nonexistent/nnUNet_results")


TORCHRES_KWARGS = {"force_separate_z": False, "memefficient_seg_resampling": False}


RESAMPLERS = {  # --resampler -> which resampling functions switch to the torch resampler
    "plans": (),
    "torch": ("data", "seg", "probabilities"),
    "torch-input": ("data", "seg"),  # the image on the way in only
    "torch-export": ("probabilities",),  # the logits on the way out only
}


def use_torch_resampler(predictor: nnUNetPredictor, which=("data", "seg", "probabilities")) -> None:
    """What nnU-Net's nnUNetPlannerResEncL_torchres writes into plans, applied to the loaded plans."""
    configuration = predictor.configuration_manager.configuration
    for key in which:
        configuration[f"resampling_fn_{key}"] = "resample_torch_fornnunet"
        configuration[f"resampling_fn_{key}_kwargs"] = {"is_seg": key == "seg", **TORCHRES_KWARGS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", required=True, help="folder of <case>_0000.nii.gz")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("-f", "--folds", nargs="+", default=["all"])
    parser.add_argument("--step-size", type=float, default=0.5)
    parser.add_argument("--resampler", choices=list(RESAMPLERS), default="plans",
                        help="plans: as plans.json says; torch: the torch resampler throughout; "
                             "torch-input / torch-export: only on the way in / out")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (nnU-Net's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: nnU-Net's GPU path (perform_everything_on_device, fp16 autocast)")
    parser.add_argument("--timings", required=True, help="JSON file to write per-case timings to")
    args = parser.parse_args(argv)

    process_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    on_gpu = args.device == "cuda"
    predictor = nnUNetPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=args.tta,
                                perform_everything_on_device=on_gpu, device=torch.device(args.device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    folds = tuple(f if f == "all" else int(f) for f in args.folds)
    load_start = time.perf_counter()
    predictor.initialize_from_trained_model_folder(args.model, use_folds=folds,
                                                   checkpoint_name="checkpoint_final.pth")
    use_torch_resampler(predictor, RESAMPLERS[args.resampler])
    load_seconds = time.perf_counter() - load_start

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    ending = predictor.dataset_json["file_ending"]
    images = sorted(Path(args.input).glob(f"*_0000{ending}"))
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    cases = {}
    for image in images:
        case = image.name[: -len(f"_0000{ending}")]
        times = {}
        cpu_start = time.process_time()
        start = time.perf_counter()
        data, _seg, properties = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                                       predictor.configuration_manager,
                                                       predictor.dataset_json)
        times["preprocess"] = time.perf_counter() - start
        t = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        times["network"] = time.perf_counter() - t
        t = time.perf_counter()
        export_prediction_from_logits(logits, properties, predictor.configuration_manager,
                                      predictor.plans_manager, predictor.dataset_json,
                                      str(output / case), False)
        times["export"] = time.perf_counter() - t
        times["total"] = time.perf_counter() - start
        times["cpu"] = time.process_time() - cpu_start
        times["preprocessed_shape"] = list(data.shape[1:])
        cases[case] = times
        print(f"nnunet[{args.resampler}] {case}: {times['total']:.2f} s "
              f"(preprocess {times['preprocess']:.2f}, network {times['network']:.2f}, "
              f"export {times['export']:.2f})", flush=True)

    configuration = predictor.configuration_manager.configuration
    result = {
        "nnunetv2": getattr(nnunetv2, "__version__", None) or _distribution_version("nnunetv2"),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "resampler": args.resampler,
        "tta": args.tta,
        "resampling_fn_data": configuration["resampling_fn_data"],
        "resampling_fn_data_kwargs": configuration["resampling_fn_data_kwargs"],
        "resampling_fn_probabilities": configuration["resampling_fn_probabilities"],
        "resampling_fn_probabilities_kwargs": configuration["resampling_fn_probabilities_kwargs"],
        "model_load_seconds": load_seconds,
        "process_seconds": time.perf_counter() - process_start,
        "cases": cases,
    }
    Path(args.timings).write_text(json.dumps(result, indent=2))
    return 0


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
