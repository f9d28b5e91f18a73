"""`python -m inference`: predict lesion masks for every case in a folder.

Flags are named like nnUNetv2_predict's where they mean the same (-i, -o, -f, -chk, -step_size, -device).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable, Iterator

import SimpleITK as sitk
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from flare_common.arguments import OneLineParser, number, positive_int, program_name
from flare_common.files import write_text_atomically

from . import batch, io, provenance
from .dicom_seg import SEG_SUFFIX
from .dicom_series import DicomSeries
from .errors import CaseError, ModelError
from .model.loader import resolve_device
from .model.calibration import check_precision, read_calibration, recorded_precision
from .network_plan import check_request, settings_from_record
from .postprocess import lesion_label_ids
from .run_model import load_for_run
from .settings import CROP_MODES, MAX_PATCH_SCALE, PredictionSettings, RunOptions, prefer_expandable_segments
from .timing import STAGE_ORDER, process_start_time

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["build_parser", "entry_point", "main"]

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
DEFAULTS = PredictionSettings()  # the flags' defaults are the API's
EXAMPLES = """examples:
  python -m inference -i scans/ -o masks/                       # the embedded model, GPU if there is one
  python -m inference -i scans/ -o masks/ -m nnUNet_results/Dataset123_X/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      -f 0 1 2 3 4 --lesion-labels 2                            # your nnU-Net v2 model, a 5-fold ensemble
  python -m inference -i scans/ -o masks/ --time-budget 45 --on-error empty --timings times.json
                                                                # never over 45 s a case, never no mask
                                                                # (predict.sh, the FLARE entry, runs neither)
"""
log = logging.getLogger("inference")


def non_negative(text: str) -> float:
    return number(text, low=0)


def probability(text: str) -> float:
    return number(text, low=0, high=1)


def step_fraction(text: str) -> float:
    return number(text, low=0, high=1, low_open=True)


def patch_scale(text: str) -> float:
    # the patch never goes below the training patch (network_plan.scaled_patch): a scale under 1 would be a no-op
    return number(text, low=1, high=MAX_PATCH_SCALE)


def finite(text: str) -> float:
    return number(text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=program_name("inference", "flare-predict"), description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("-i", "--input", required=True,
                        help="folder of <case>_0000.nii.gz images, or one image (<case>[_0000].nii.gz)")
    parser.add_argument("-o", "--output", required=True, help="folder for <case>.nii.gz masks")
    parser.add_argument("-m", "--model", default=str(DEFAULT_MODEL), help="nnU-Net v2 model folder")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to ensemble (default: 'all' if present, else every fold_N)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file name inside each fold_X folder (default: checkpoint_final.pth)")
    parser.add_argument("-c", "--configuration", default=None,
                        help="plans configuration (default: from the folder name, else 3d_fullres)")
    parser.add_argument("-device", "--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto (default): the GPU if torch sees one, else the CPU")
    parser.add_argument("--backend", default=None, choices=["auto", "torch", "onnx", "tensorrt"],
                        help="auto (default, unless the model's calibration chose torch): torch on CUDA; ONNX Runtime "
                             "on the CPU from an export of the same checkpoint (the model folder's, else one made once "
                             "into ~/.cache), else torch; or force one (onnx/tensorrt need `python -m "
                             "inference.export_onnx` first)")
    parser.add_argument("--precision", choices=["fp16", "fp32"], default=None,
                        help="what torch computes in on CUDA: fp16 (autocast, as nnU-Net) or fp32 (default: the "
                             "model's CUDA calibration record, else fp16); the CPU computes in fp32")
    parser.add_argument("-step_size", "--step-size", type=step_fraction, default=None,
                        help="window step as a fraction of the patch, within (0, 1] (default: the model's calibration "
                             f"record, inference.json, else {DEFAULTS.step_size}: half overlap)")
    parser.add_argument("--patch-size", type=positive_int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="inference patch, a multiple of the network's stride (default: training patch x "
                             "--patch-scale)")
    parser.add_argument("--patch-scale", type=patch_scale, default=None,
                        help="inference patch as a multiple of the training patch, rounded to the network's stride, "
                             f"within [1, {MAX_PATCH_SCALE:g}] (default: the model's calibration record, inference.json, "
                             f"else {DEFAULTS.patch_scale:g}: nnU-Net's tiling)")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    parser.add_argument("--crop", choices=CROP_MODES, default=None,
                        help="exact: run only the windows that meet the body's box, on the whole volume's grid (the "
                             "uncropped mask inside the box, 0 outside); box: cut the box out and tile the cut (fewer "
                             "windows, another mask); none: every window (default: the model's calibration record, "
                             f"else {DEFAULTS.crop})")
    parser.add_argument("--no-crop", action="store_true", help="the same as --crop none")
    parser.add_argument("--crop-threshold", type=finite, default=DEFAULTS.crop_threshold_hu,
                        help="body threshold (HU)")
    parser.add_argument("--crop-margin", type=non_negative, default=DEFAULTS.crop_margin_mm,
                        help="margin around the body (mm)")
    parser.add_argument("--lesion-labels", type=positive_int, nargs="+", default=None,
                        help="model labels mapped to 1 (default: every non-background label)")
    parser.add_argument("--resample-back", choices=["logits", "labels"], default=DEFAULTS.resample_back,
                        help="back to the input grid: logits (trilinear, then argmax; default, smoother) or "
                             "labels (argmax, then nearest; least memory)")
    parser.add_argument("--min-lesion-ml", type=non_negative, default=None,
                        help="drop predicted lesions smaller than this (default: the model folder's "
                             "lesion_filter.json, else 0 = keep all)")
    parser.add_argument("--min-lesion-probability", type=probability, default=None,
                        help="drop predicted lesions whose most confident voxel is below this lesion "
                             "probability, within [0, 1] (default: lesion_filter.json, else 0 = keep all)")
    parser.add_argument("--time-budget", type=non_negative, default=None, metavar="SECONDS",
                        help="per-case time budget: when the network is predicted (windows x the measured time "
                             "of one) to overrun it, take a larger step (0.75, then 1.0) and say so")
    parser.add_argument("--on-error", choices=["fail", "empty"], default="fail",
                        help="a case that fails: no mask (fail, default) or an all-zero mask on the input's "
                             "grid (empty: challenge mode, since a missing output scores zero anyway); the "
                             "exit code is non-zero either way")
    parser.add_argument("--output-format", choices=["nifti", "dicom-seg"], default="nifti",
                        help="nifti (default): <case>.nii.gz, 0/1 on the input's grid; dicom-seg: <case>.dcm, a DICOM "
                             "Segmentation referencing the source series (DICOM input only; docs/dicom.md)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write each case's lesion probability (softmax of the summed logits, on the input's "
                             "grid) as uint8 round(p x 255) to OUTPUT/probabilities/<case>.nii.gz, beside the masks' "
                             "folder (with --output-format dicom-seg: <case>.dcm, a FRACTIONAL SEG)")
    parser.add_argument("--timings", default=None, help="write per-case stage timings to this JSON (the run report)")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="write the run report to this JSON: engine version and commit, library and driver "
                             "versions, device, the settings used (after the model's calibration), the model's "
                             "fingerprint, each case's input, output, status, error and stage times")
    parser.add_argument("--skip-existing", action="store_true", help="keep masks already written")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="spread the cases over Ray workers (one per GPU, else one per --ray-cpus cores): Ray "
                             "on this machine, or the cluster at ADDRESS (docs/scale-out.md)")
    parser.add_argument("--ray-cpus", type=positive_int, default=1, metavar="N",
                        help="cores per worker without GPUs (1)")
    parser.add_argument("--ray-workers", type=positive_int, default=None, metavar="N",
                        help="at most N workers (default: as many as the cluster's GPUs, or cores / --ray-cpus)")
    parser.add_argument("--journal", default=None, metavar="FILE",
                        help="with --ray: the run's journal, outside the output folder (default OUT.journal.jsonl); "
                             "a rerun skips the cases it records as done")
    parser.add_argument("--sequential", action="store_true",
                        help="one case after another (read, compute, write) instead of reading the next case "
                             "and writing the last mask while a case is computed")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="also a progress bar over each case's windows (on a terminal)")
    return parser


def run_options_from_args(args: argparse.Namespace) -> RunOptions:
    """The command line's flags that are not PredictionSettings, typed: nothing below this module sees `args`."""
    return RunOptions(
        input=Path(args.input), output=Path(args.output), model=Path(args.model),
        folds=tuple(str(f) for f in args.folds) if args.folds else None, checkpoint=args.checkpoint,
        configuration=args.configuration, device=args.device, backend=args.backend, precision=args.precision,
        on_error=args.on_error,
        output_format=args.output_format, save_probabilities=args.save_probabilities,
        timings=Path(args.timings) if args.timings else None, report=Path(args.report) if args.report else None,
        skip_existing=args.skip_existing,
        ray_address=args.ray, ray_cpus=args.ray_cpus, ray_workers=args.ray_workers,
        journal=Path(args.journal) if args.journal else None, sequential=args.sequential, quiet=args.quiet,
        verbose=args.verbose)


def settings_from_args(args: argparse.Namespace) -> dict:
    """The PredictionSettings fields the command line sets: every flag's, and the patch scale and step only where a
    flag gives them (else the model's calibration decides: network_plan.calibrated_settings)."""
    given = dict(
        patch_size=tuple(args.patch_size) if args.patch_size else None, tta=args.tta,
        crop_threshold_hu=args.crop_threshold, crop_margin_mm=args.crop_margin,
        lesion_labels=tuple(args.lesion_labels) if args.lesion_labels else None,
        resample_back=args.resample_back, min_lesion_ml=args.min_lesion_ml,
        min_lesion_probability=args.min_lesion_probability, time_budget_s=args.time_budget)
    crop = "none" if args.no_crop else args.crop
    given.update({name: value for name, value in (("patch_scale", args.patch_scale), ("step_size", args.step_size),
                                                  ("crop", crop)) if value is not None})
    return given


def format_timings(seconds: dict) -> str:
    return ", ".join(f"{s} {seconds[s]:.2f}" for s in STAGE_ORDER if s in seconds)


class Stopped(KeyboardInterrupt):
    """SIGTERM (`docker stop`), raised where Python is so that every `finally` runs: the partial mask of the
    case being written is removed. A KeyboardInterrupt, so that the per-case `except Exception` lets it by."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stopped_by: list[int] = []  # the signal, also where a library raises its own KeyboardInterrupt instead (Ray)


def _stop(signum, frame):
    _stopped_by.append(signum)
    raise Stopped(signum)


def write_empty_mask(path: Path, output_path: Path) -> bool:
    """--on-error empty: the all-zero mask of a failed case, said in one line (or why there is none); whether it
    was written. Its note says it is no finished mask: --skip-existing and a resumed run compute the case again."""
    try:
        io.write_empty_mask(path, output_path)
        log.warning("warning: %s: wrote an empty mask %s (--on-error empty)", path, output_path.name)
        return True
    except CaseError as err:
        log.error("error: %s", err)
        return False


def entry_point() -> None:
    """`python -m inference`, `flare-predict`: main(), then leave at once. The masks and the --timings file
    are written and closed by then; tearing down the interpreter (torch's modules, a gigabyte of freed
    arrays) took 0.5 s of every case for nothing the OS does not reclaim anyway."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    imports_done_at = time.time()  # this module's imports (torch among them) are the start-up's bulk
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_crop and args.crop not in (None, "none"):
        parser.error(f"--no-crop contradicts --crop {args.crop}")
    options, given = run_options_from_args(args), settings_from_args(args)
    _stopped_by.clear()
    prefer_expandable_segments()  # before CUDA starts
    logging.basicConfig(level=logging.WARNING if options.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    # ITK prints multi-line warnings of its own; io.py checks what matters and says it in one line.
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    signal.signal(signal.SIGTERM, _stop)
    done: list[str] = []
    try:
        return run(options, given, imports_done_at, done)
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", None) or (_stopped_by[0] if _stopped_by else signal.SIGINT)
        log.error("error: stopped by %s after %d case(s); no partial mask left", signal.Signals(signum).name,
                  len(done))
        return 128 + signum


def run(options: RunOptions, given: dict, imports_done_at: float, done: list[str]) -> int:
    """The CLI's work; `done` receives the name of each case whose mask is written. `given`: the settings the flags
    set (settings_from_args); the model's calibration record sets the others."""
    try:
        # every flag and path is checked before the first case: a run that cannot finish stops here
        scan = io.find_cases(options.input)
        io.set_aside_earlier_masks(scan, options.output)
        check_input_kind(scan, options)
        outputs = io.output_paths(scan.cases + [path for path, _ in scan.broken], options.output,
                                  SEG_SUFFIX if options.output_format == "dicom-seg" else ".nii.gz")
        for flag, path in (("--timings", options.timings), ("--report", options.report)):
            if path:
                io.check_file_can_be_written(path, flag)
        io.prepare_output_folder(options.output)
        journal = ray_journal(options) if options.on_ray else None
        # the kind of device the networks run on: a --ray driver's workers', not the driver's
        kind = options.device if options.device in ("cpu", "cuda") else (
            workers_device_kind(options) if options.on_ray else resolve_device("auto").type)
        calibration = read_calibration(options.model, kind)
        if options.backend is None:  # the CPU backend a cpu record chose (a cuda record's is torch on CUDA)
            options = replace(options, backend=calibration.backend if calibration and calibration.device == kind
                              else "auto")
        check_precision(options.precision, kind, options.backend)
        load_start = time.perf_counter()
        # with --ray the workers load the model; here it is only checked, on the CPU
        asked = PredictionSettings(**{**(calibration.settings if calibration else {}), **given})
        model = load_for_run(options, asked, check_only=options.on_ray)
        settings, calibration_line = settings_from_record(calibration, model.fingerprint(), kind, **given)
        check_settings(model, settings)
        # what a cuda record chose, decided here for every worker (and in the run's fingerprint); else each device's
        options = replace(options, precision=options.precision or recorded_precision(calibration, model.fingerprint(),
                                                                                     kind))
        load_seconds = time.perf_counter() - load_start
        model_loaded_at = time.time()
        run_id = provenance.run_fingerprint(model.fingerprint(), settings, options.backend, options.device,
                                            options.precision)
    except (CaseError, ModelError, ValueError) as err:
        log.error("error: %s", err)
        return 2
    for path, reason in scan.skipped:
        log.warning("skipped: %s: %s", path, reason)
    # Bars belong on a terminal: in a log (docker logs, the efficiency harness, CI) one line a case says it all.
    on_terminal = sys.stderr.isatty() and not options.quiet
    total = len(scan.cases) + len(scan.broken)
    log.info("model %s (folds %s, %s on %s) loaded in %.2f s; %d case(s)", options.model, ",".join(model.folds),
             f"{model.backend} {model.precision}" if model.device.type == "cuda" else model.backend, model.device,
             load_seconds, total)
    (log.warning if calibration_line.startswith("warning") else log.info)("%s", calibration_line)
    # Absolute times (seconds since the epoch) of the start-up, for timelines drawn beside the container's
    # own start and end (evaluation/run_efficiency.py); each case adds its stages' [start, end] under "at".
    startup = {"process_start": process_start_time(), "imports_done": imports_done_at,
               "model_loaded": model_loaded_at}
    report = {"model": str(options.model), "device": str(model.device), "backend": model.backend,
              # a --ray driver's model is only checked, on the CPU: its workers compute in what was asked
              "precision": (options.precision or "each device's") if options.on_ray else model.precision,
              "folds": list(model.folds), "model_load_s": load_seconds, "run_fingerprint": run_id,
              "model_fingerprint": model.fingerprint(), "settings": asdict(settings), "calibration": calibration_line,
              "input": str(options.input), "output": str(options.output), "output_format": options.output_format,
              # what the run ran on: asked for only where a report is written (it runs git, and NVML on a GPU)
              "environment": provenance.run_environment(model.device) if options.timings or options.report else None,
              "startup": startup, "cases": {}}
    failures = len(scan.broken)
    for path, reason in scan.broken:
        report_failure(path, outputs[path], f"{path}: {reason}", options, report)
    todo = scan.cases
    if options.skip_existing:
        todo = [path for path in scan.cases
                if not kept_from_earlier_run(path, outputs[path], run_id, options.save_probabilities)]
    try:
        with closing(case_results(todo, outputs, model, settings, options, run_id, journal,
                                  progress=on_terminal and options.verbose)) as results, logging_redirect_tqdm():
            failures += record_results(results, todo, outputs, options, report, done,
                                       show_bar=on_terminal and len(todo) > 1)
    except ModelError as err:  # --ray: Ray missing, or no cluster at the address
        log.error("error: %s", err)
        return 2
    for flag, path in (("--timings", options.timings), ("--report", options.report)):
        if path:
            try:
                write_text_atomically(path, json.dumps(report, indent=2))
            except OSError as err:
                log.error("error: %s: %s not written (%s)", path, flag, err.strerror or err)
                failures += 1
    if failures:
        log.error("error: %d of %d case(s) failed", failures, total)
    return 1 if failures else 0


def check_input_kind(scan: io.CaseScan, options: RunOptions) -> None:
    """What DICOM input and SEG output allow, checked before any work (CaseError, one line): a SEG refers to the
    source instances it segments, so it needs DICOM input; a series is read here, not on Ray workers, and its
    outputs carry no provenance note to be kept from an earlier run by."""
    cases = scan.cases + [case for case, _ in scan.broken]
    series = [case for case in cases if isinstance(case, DicomSeries)]
    if options.output_format == "dicom-seg" and len(series) < len(cases):
        raise CaseError(f"{options.input}: --output-format dicom-seg needs DICOM series as input (a SEG refers to "
                        "the source images it segments); this input holds NIfTI images")
    for flag, given in (("--ray", options.on_ray), ("--skip-existing", options.skip_existing),
                        ("--on-error empty", options.on_error == "empty")):
        if series and given:
            raise CaseError(f"{options.input}: {flag} is not supported for DICOM input yet; run it without {flag}")
    if options.output_format == "dicom-seg":
        try:
            import highdicom  # noqa: F401 - checked here, not after every case was computed
        except ImportError:
            raise CaseError("--output-format dicom-seg needs highdicom: pip install highdicom") from None


def check_settings(model, settings: PredictionSettings) -> None:
    """What the flags ask of this model, checked before any case: the patch (network_plan.check_request) and the
    lesion labels. ModelError or ValueError, one line."""
    check_request(model, settings)
    lesion_label_ids(model.config.labels, settings.lesion_labels)


def kept_from_earlier_run(path: Path, output: Path, run_id: str | None, probabilities: bool = False) -> bool:
    """--skip-existing: whether the mask already at `output` is kept, which it is only where it passes the checks
    of a fresh write and was made by this model and settings from this input (io.reusable_mask_problem), and, with
    `probabilities` (--save-probabilities), where its probability beside it does too; a mask that is there and is
    not kept is said to be computed again."""
    if not output.is_file():
        return False
    try:
        note = provenance.mask_note(run_id, path)
    except OSError:
        return False  # the case fails where it is read, with its line
    problem = io.reusable_mask_problem(path, output, note)
    if problem is None and probabilities:
        problem = io.reusable_mask_problem(path, batch.probability_path(output), note)
        problem = problem and f"kept, but its probability is {problem}"
    if problem is not None:
        log.info("%s: computed again (--skip-existing): the mask there is %s", output, problem)
    return problem is None


def workers_device_kind(options: RunOptions) -> str:
    """--ray --device auto: the kind of device the cluster's workers compute on (scale_out.py)."""
    from .scale_out import cluster_device_kind

    return cluster_device_kind(options.ray_address or None)


def ray_journal(options: RunOptions):
    """--ray's journal, its folder checked for writing before any work (scale_out.Journal)."""
    from .scale_out import Journal, default_journal

    return Journal(options.journal or default_journal(options.output))


def case_results(todo: list[Path], outputs: dict[Path, Path], model, settings: PredictionSettings,
                 options: RunOptions, run_id: str | None, journal, progress: bool = False
                 ) -> Iterator[batch.CaseResult]:
    """Each case's result as its mask is written or it fails: on Ray workers with --ray (scale_out.py, the only
    place Ray is imported), else in this process, pipelined unless --sequential (batch.py)."""
    if not options.on_ray:
        return batch.predict_cases(todo, outputs, model, settings, pipelined=not options.sequential, run=run_id,
                                   progress=progress, probabilities=options.save_probabilities)
    from .scale_out import predict_on_ray

    return predict_on_ray(todo, outputs, options, settings, journal, run=run_id)


def report_failure(path: Path, output: Path, error: str, options: RunOptions, report: dict) -> None:
    """A failed case: its one line, its entry in the report, and no mask of an earlier run left where its mask
    would be (a scorer would take it for this run's); under --on-error empty, the empty mask instead."""
    log.error("error: %s%s", error, remove_earlier_mask(output))
    report["cases"][path.name] = {"status": "failed", "error": error, "input": str(path), "output": None}
    if options.on_error == "empty" and write_empty_mask(path, output):
        report["cases"][path.name]["output"] = str(output)  # the empty mask of a failed case


def remove_earlier_mask(output: Path) -> str:
    """Remove the file an earlier run left at a failed case's mask path (and its probability's); what the error line
    adds about it."""
    try:
        batch.probability_path(output).unlink(missing_ok=True)
    except OSError:  # a folder or an unwritable file there: the mask's line below is what matters
        pass
    if not (output.is_file() or output.is_symlink()):
        return ""
    try:
        output.unlink()
    except OSError as err:
        return f" (and {output}, an earlier run's mask, could not be removed: {err.strerror or err})"
    return f" (removed {output.name}, an earlier run's mask)"


def record_results(results: Iterable[batch.CaseResult], todo: list[Path], outputs: dict[Path, Path],
                   options: RunOptions, report: dict, done: list[str], show_bar: bool) -> int:
    """Log and report each result, with an empty mask for a failed case under --on-error empty; returns the
    number of failed cases. The one place results are handled, wherever the cases ran. A case of `todo` whose
    result never comes back is a failed case too, said in one line: never a run that ends well without it."""
    failures, seen = 0, set()
    for result in tqdm(results, total=len(todo), desc="cases", unit="case", disable=not show_bar):
        path = result.path
        seen.add(path)
        if result.kept:
            done.append(path.name)
            report["cases"][path.name] = {"status": "kept", "input": str(path), "output": str(result.output)}
            continue
        if result.error is not None:
            failures += 1
            report_failure(path, result.output, result.error, options, report)
            continue
        done.append(path.name)
        report["cases"][path.name] = {**result.report.as_dict(), "status": "ok", "input": str(path),
                                      "output": str(result.output)}
        if options.save_probabilities:
            report["cases"][path.name]["probability"] = str(batch.probability_path(result.output))
        where = f" on worker {result.worker}" if result.worker is not None else ""
        log.info("%s: %.2f s%s (%s)", io.case_id(path), result.report.seconds["total"], where,
                 format_timings(result.report.seconds))
    for path in todo:
        if path not in seen:
            failures += 1
            report_failure(path, outputs[path], f"{path}: no result came back for it (a fault of the engine)",
                           options, report)
    return failures
