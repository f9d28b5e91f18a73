"""`python -m inference.calibrate`: measure this model's speed settings against nnU-Net's own, and keep the fastest
that costs no accuracy.

    python -m inference.calibrate -m MODEL --images DIR [--labels DIR] [-f FOLD ...] [--device cpu|cuda]

Every candidate (the inference patch as 1.0 / 1.2 / 1.5 x the training patch, step 0.5 / 0.75, the exact crop or the
box crop; on the CPU with ONNX Runtime, `--backend auto`; on CUDA with torch in fp16 autocast) runs every case of
--images, as does the reference: nnU-Net's tiling (the training patch, step 0.5, torch in fp32) with the exact crop,
whose mask is nnU-Net's inside the body's box. Candidates whose scales round to the same inference patch for this
model are one candidate: measured once, listed with `same_as`. For each candidate: seconds per case (the pipeline,
the read left out), agreement with the reference's masks (DSC per case), and where --labels are given the lesion DSC against them. Chosen: the fastest
candidate whose mean lesion DSC is at least the reference's - --tolerance (0.005) and whose every case is at least
the reference's - --case-tolerance (0.05); without labels, whose masks agree with the reference's at DSC >= 0.99 on
average and >= 0.95 on every case. The reference itself always qualifies.

The choice, the evidence (every candidate's figures) and the fingerprint of the model it was measured on are written
to MODEL/inference.json as the record of this kind of device (cpu or cuda; a record of the other kind is kept where
it was measured on the same model; model/calibration.py reads it). `python -m inference`, `predict.sh` and
`predict_image` use the chosen settings wherever no flag sets them; a record made for other weights or plans is not used (said in
a line). The export of the model for ONNX Runtime (made before the first case, once) is timed and recorded too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_common.arguments import OneLineParser, number
from flare_common.files import write_text_atomically

from . import __version__, io
from .backends import TorchNetwork
from .errors import CaseError, ModelError
from .model import LoadedModel
from .model.calibration import CALIBRATION_FILE, read_records
from .model.plans import scaled_patch
from .pipeline import predict_image_with_report
from .run_model import load_for_run
from .settings import PredictionSettings, RunOptions

log = logging.getLogger("inference")

PATCH_SCALES = (1.0, 1.2, 1.5)
STEPS = (0.5, 0.75)
CROPS = ("exact", "box")
REFERENCE = (1.0, 0.5, "torch", "exact")  # nnU-Net's tiling: the training patch, half-overlapping windows, torch


@dataclass
class Candidate:
    patch_scale: float
    step_size: float
    backend: str
    crop: str
    precision: str = "fp32"  # on CUDA fp16 (autocast) or fp32; the CPU computes in fp32
    seconds: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    lesion_dsc: list[float] = field(default_factory=list)
    qualifies: bool = False
    inference_patch: tuple[int, ...] | None = None  # the training patch x patch_scale for the model measured
    same_as: float | None = None  # the patch scale of the candidate measured for it (the same inference patch)

    def summary(self) -> dict:
        mean = (lambda values: round(float(np.mean(values)), 4) if values else None)
        return {"patch_scale": self.patch_scale, "step_size": self.step_size, "backend": self.backend,
                "crop": self.crop, "precision": self.precision,
                "inference_patch": list(self.inference_patch) if self.inference_patch else None,
                "same_as": self.same_as,
                "seconds_per_case": round(float(np.mean(self.seconds)), 3), "mean_agreement": mean(self.agreement),
                "min_agreement": round(min(self.agreement), 4), "mean_lesion_dsc": mean(self.lesion_dsc),
                "per_case_seconds": [round(s, 3) for s in self.seconds],
                "per_case_agreement": [round(a, 4) for a in self.agreement],
                "per_case_lesion_dsc": [round(d, 4) for d in self.lesion_dsc], "qualifies": self.qualifies}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int(np.logical_and(a, b).sum()) / total


def candidates(device: str) -> list[Candidate]:
    """The reference (fp32) first, then every other candidate: on the CPU with ONNX Runtime (`auto`; its logits are
    torch's within 1e-5, so torch at the same tiling would only be slower), on CUDA with torch in fp16 autocast (at
    the reference's tiling too: what fp16 alone costs)."""
    backend, precision = ("auto", "fp32") if device == "cpu" else ("torch", "fp16")
    return [Candidate(*REFERENCE)] + [Candidate(scale, step, backend, crop, precision)
                                      for crop in CROPS for scale in PATCH_SCALES for step in STEPS]


def qualifies(candidate: Candidate, reference: Candidate, tolerance: float, case_tolerance: float) -> bool:
    """Within the tolerances of the reference (see module doc)."""
    if reference.lesion_dsc:
        return bool(np.mean(candidate.lesion_dsc) >= np.mean(reference.lesion_dsc) - tolerance
                    and all(c >= r - case_tolerance for c, r in zip(candidate.lesion_dsc, reference.lesion_dsc)))
    return bool(np.mean(candidate.agreement) >= 0.99 and min(candidate.agreement) >= 0.95)


def choose(measured: list[Candidate], tolerance: float, case_tolerance: float) -> Candidate:
    """The fastest qualifying candidate (the reference is measured[0] and always qualifies)."""
    reference = measured[0]
    for candidate in measured:
        candidate.qualifies = candidate is reference or qualifies(candidate, reference, tolerance, case_tolerance)
    return min((c for c in measured if c.qualifies), key=lambda c: np.mean(c.seconds))


def first_run_export_seconds(options: RunOptions) -> float | None:
    """What a first `--backend auto` run on a CPU spends exporting the model before its first case (every fold,
    exported again into a scratch folder, so that a cached export does not hide it); None where ONNX cannot run."""
    from .export_onnx import can_export, export_fold  # the exporter brings torch.onnx: only where it is used
    from .model.loader import select_folds

    if not can_export():
        return None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for fold in select_folds(options.model, options.folds):
            try:
                export_fold(options.model, fold, output=Path(scratch) / f"{fold}.onnx",
                            checkpoint_name=options.checkpoint, configuration=options.configuration)
            except (ModelError, OSError) as err:
                log.warning("warning: %s: no ONNX export (%s)", options.model, err)
                return None
    return time.perf_counter() - started


def with_precision(model: LoadedModel, precision: str) -> LoadedModel:
    """The same loaded networks computing in `precision` (torch on CUDA): one copy of the weights on the GPU, so that
    the memory a candidate's patch is chosen with is a real run's."""
    if model.device.type != "cuda" or model.backend != "torch" or model.precision == precision:
        return model
    networks = [TorchNetwork(network.module, network.device, network.source, fp16=precision == "fp16")
                for network in model.networks]
    return replace(model, networks=networks, precision=precision)


def measure(options: RunOptions, images: list[sitk.Image], truths: list[np.ndarray] | None,
            device: str) -> tuple[list[Candidate], str]:
    """Every candidate on every image; the model's fingerprint."""
    measured, models, reference_masks, fingerprint, runs = candidates(device), {}, [], None, {}
    for candidate in measured:
        if candidate.backend not in models:
            models[candidate.backend] = load_for_run(
                RunOptions(options.input, options.output, options.model, options.folds, options.checkpoint,
                           options.configuration, device, candidate.backend,
                           precision="fp32" if device == "cuda" else None), PredictionSettings())
        model = with_precision(models[candidate.backend], candidate.precision)
        fingerprint = fingerprint or model.fingerprint()
        candidate.inference_patch = scaled_patch(model.config.patch_size, model.config.total_stride,
                                                 candidate.patch_scale)
        run = (candidate.inference_patch, candidate.step_size, candidate.backend, candidate.crop, candidate.precision)
        if run in runs:  # the same windows on the same network: the same masks and time
            earlier = runs[run]
            candidate.same_as = earlier.patch_scale
            candidate.seconds, candidate.agreement = list(earlier.seconds), list(earlier.agreement)
            candidate.lesion_dsc = list(earlier.lesion_dsc)
            log.info("patch x%g, step %g, %s crop: the inference patch of x%g (%s), not measured again",
                     candidate.patch_scale, candidate.step_size, candidate.crop, earlier.patch_scale,
                     "x".join(map(str, candidate.inference_patch)))
            continue
        runs[run] = candidate
        settings = PredictionSettings(patch_scale=candidate.patch_scale, step_size=candidate.step_size,
                                      crop=candidate.crop)
        for index, image in enumerate(images):
            started = time.perf_counter()
            mask, _ = predict_image_with_report(image, model, settings)
            candidate.seconds.append(time.perf_counter() - started)
            mask = sitk.GetArrayViewFromImage(mask) > 0
            if candidate is measured[0]:
                reference_masks.append(mask.copy())
            candidate.agreement.append(dice(mask, reference_masks[index]))
            if truths is not None:
                candidate.lesion_dsc.append(dice(mask, truths[index]))
        log.info("patch x%g, step %g, %s crop, %s: %.2f s a case, agreement %.4f%s", candidate.patch_scale,
                 candidate.step_size, candidate.crop,
                 "ONNX Runtime" if candidate.backend == "auto" and device == "cpu" else f"torch {candidate.precision}",
                 np.mean(candidate.seconds), np.mean(candidate.agreement),
                 f", lesion DSC {np.mean(candidate.lesion_dsc):.4f}" if candidate.lesion_dsc else "")
    return measured, fingerprint


def records_kept(path: Path, fingerprint: str) -> dict[str, dict]:
    """The records of `path` measured on the model of `fingerprint` (another kind of device's, kept beside the new
    one); a record of other weights, or a file that is not a calibration file, is replaced (said in a line)."""
    if not path.exists():
        return {}
    try:
        records = read_records(path)
    except (OSError, ValueError) as err:
        log.warning("warning: %s: not a calibration file (%s); replaced", path, err)
        return {}
    kept = {kind: record for kind, record in records.items()
            if isinstance(record, dict) and record.get("model_fingerprint") == fingerprint}
    for kind in sorted(set(records) - set(kept)):
        log.warning("warning: %s: its %s record was measured on another model (folds, weights, plans or lesion "
                    "filter); dropped", path, kind)
    return kept


def read_cases(images_dir: Path, labels_dir: Path | None) -> tuple[list[str], list[sitk.Image], list | None]:
    scan = io.find_cases(images_dir)
    if scan.broken:
        raise CaseError(f"{scan.broken[0][0]}: {scan.broken[0][1]}")
    names = [io.case_id(path) for path in scan.cases]
    images = [io.read_checked(path) for path in scan.cases]
    truths = None
    if labels_dir is not None:
        truths = []
        for name, image in zip(names, images):
            path = labels_dir / f"{name}.nii.gz"
            if not path.is_file():
                raise CaseError(f"{path}: no label for {name}")
            label = sitk.GetArrayFromImage(io.read_checked(path))
            if label.shape != sitk.GetArrayViewFromImage(image).shape:
                raise CaseError(f"{path}: its size differs from the image's")
            truths.append(label > 0)
    return names, images, truths


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m inference.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, help="nnU-Net v2 model folder (inference.json is written there)")
    parser.add_argument("--images", required=True, type=Path, help="folder of <case>_0000.nii.gz validation images")
    parser.add_argument("--labels", type=Path, default=None, help="folder of <case>.nii.gz lesion labels (optional)")
    parser.add_argument("-f", "--folds", nargs="+", default=None)
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("-c", "--configuration", default=None)
    parser.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tolerance", type=lambda t: number(t, low=0, high=1), default=0.005,
                        help="mean lesion DSC a candidate may lose against the reference (0.005)")
    parser.add_argument("--case-tolerance", type=lambda t: number(t, low=0, high=1), default=0.05,
                        help="lesion DSC any one case may lose (0.05)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    model_dir = Path(args.model)
    try:
        io.check_file_can_be_written(model_dir / CALIBRATION_FILE, "the calibration record")
        names, images, truths = read_cases(args.images, args.labels)
        with tempfile.TemporaryDirectory() as scratch:
            options = RunOptions(args.images, Path(scratch), model_dir,
                                 tuple(args.folds) if args.folds else None, args.checkpoint, args.configuration)
            export_seconds = first_run_export_seconds(options) if args.device == "cpu" else None
            measured, fingerprint = measure(options, images, truths, args.device)
    except (CaseError, ModelError, ValueError) as err:
        log.error("error: %s", err)
        return 2
    chosen = choose(measured, args.tolerance, args.case_tolerance)
    record = {
        "chosen": {"patch_scale": chosen.patch_scale, "step_size": chosen.step_size, "backend": chosen.backend,
                   "crop": chosen.crop, "precision": chosen.precision},
        "model_fingerprint": fingerprint, "folds": args.folds, "checkpoint": args.checkpoint,
        "device": args.device, "engine": __version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "rule": (f"fastest candidate with mean lesion DSC >= reference - {args.tolerance:g} and every case >= "
                 f"reference - {args.case_tolerance:g}" if truths is not None else
                 "fastest candidate agreeing with the reference at mean DSC >= 0.99 and every case >= 0.95"),
        "reference": {"patch_scale": REFERENCE[0], "step_size": REFERENCE[1], "backend": REFERENCE[2],
                      "crop": REFERENCE[3], "precision": "fp32"},
        "cases": names, "candidates": [candidate.summary() for candidate in measured],
        # once per model and machine, before the first case of a first `--backend auto` run (--backend torch skips it)
        "first_run_export_seconds": None if export_seconds is None else round(export_seconds, 2)}
    records = {**records_kept(model_dir / CALIBRATION_FILE, fingerprint), args.device: record}
    write_text_atomically(model_dir / CALIBRATION_FILE, json.dumps({"records": records}, indent=1) + "\n")
    speedup = np.mean(measured[0].seconds) / np.mean(chosen.seconds)
    log.info("chosen: patch x%g, step %g, %s crop, %s %s: %.2f s a case, %.2fx the reference; wrote the %s record "
             "of %s", chosen.patch_scale, chosen.step_size, chosen.crop, chosen.backend, chosen.precision,
             np.mean(chosen.seconds), speedup, args.device, model_dir / CALIBRATION_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
