"""CI timing-regression check for the engine on a small fixed CPU case.

Absolute seconds depend on the machine, so the pipeline's time is divided by a calibration workload
(dense 3D convolutions and array arithmetic, the same kinds of work as the pipeline) measured in the same
run: the ratio stays put when the machine is faster or slower, and moves when our code does.

    python -m evaluation.regression --check              # fail if the ratio is > baseline x (1 + margin)
    python -m evaluation.regression --update-baseline    # after an intended change; commit the JSON

Refresh the baseline only when a change is meant to alter the engine's cost (a new stage, a different
default patch or resampling), never to make a red check green: say why in the commit message.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from evaluation.run_efficiency import machine_facts
from flare_common.files import write_text_atomically
from inference import PredictionSettings, load_model, predict_image, predict_image_with_report
from inference.model import build_network, read_model_config
from training.model_folder import make_dataset_json, make_plans, plain_unet_arch_kwargs, write_model_folder

BASELINE = Path(__file__).with_name("regression_baseline.json")
STAGES = ("crop", "resample", "network", "export")


def calibration_workload() -> None:
    """Fixed dense work: 3D convolutions like a small U-Net stage, plus trilinear resampling."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 48, 48, 48, generator=generator)
    conv = torch.nn.Conv3d(8, 8, 3, padding=1)
    with torch.inference_mode():
        for _ in range(3):
            x = torch.nn.functional.leaky_relu(conv(x))
        torch.nn.functional.interpolate(x, scale_factor=1.5, mode="trilinear")


def fixed_case() -> sitk.Image:
    """A CT-like 64x128x128 volume (body, lungs, a lesion) at 1.5 x 1.5 x 3 mm; deterministic."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 128), np.linspace(-1, 1, 128),
                          indexing="ij")
    ct = np.full(z.shape, -1000.0, np.float32)
    ct[(y / 0.7) ** 2 + (x / 0.85) ** 2 < 1] = 40
    ct[((y + 0.1) / 0.4) ** 2 + (x / 0.6) ** 2 < 1] = -850
    ct[(z ** 2 + (y - 0.3) ** 2 + (x - 0.3) ** 2) < 0.02] = 150
    ct += rng.normal(0, 15, ct.shape).astype(np.float32)
    image = sitk.GetImageFromArray(ct.astype(np.int16))
    image.SetSpacing((1.5, 1.5, 3.0))
    return image


def fixed_model(folder: Path):
    """A 4-stage PlainConvUNet (base 8 features) at 3 mm, patch 48^3, seeded weights."""
    arch = plain_unet_arch_kwargs(n_stages=4, base_features=8)
    plans = make_plans(spacing=[3.0, 3.0, 3.0], patch_size=[48, 48, 48], arch_kwargs=arch,
                       intensity_properties={"mean": 50.0, "std": 150.0, "percentile_00_5": -900.0,
                                             "percentile_99_5": 900.0})
    write_model_folder(folder, plans, make_dataset_json(), {})
    torch.manual_seed(0)
    network = build_network(read_model_config(folder))
    write_model_folder(folder, plans, make_dataset_json(), {"all": network.state_dict()})
    return load_model(folder, device="cpu")


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeats: int = 5) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: less noise from the other core's neighbours
    try:
        return _measure(repeats)
    finally:
        torch.set_num_threads(threads)


def _measure(repeats: int) -> dict:
    image = fixed_case()
    with tempfile.TemporaryDirectory() as tmp:
        model = fixed_model(Path(tmp) / "model")
        # pinned, not the defaults (which follow a model's calibration, else nnU-Net's tiling): a change of defaults
        # is not a change of the engine's speed
        settings = PredictionSettings(patch_scale=1.2, step_size=0.5)
        predict_image(image, model, settings)  # warm-up
        calibration_workload()
        stage_times = {stage: [] for stage in STAGES}
        pipeline_times, calibration_times = [], []
        for _ in range(repeats):  # interleaved, so drifts in machine speed hit both alike
            calibration_times.append(median_seconds(calibration_workload, 1))
            start = time.perf_counter()
            _, report = predict_image_with_report(image, model, settings)
            pipeline_times.append(time.perf_counter() - start)
            for stage in STAGES:
                stage_times[stage].append(report.seconds[stage])
    calibration = statistics.median(calibration_times)
    return {
        "calibration_s": calibration,
        "pipeline_s": statistics.median(pipeline_times),
        "ratio": statistics.median(pipeline_times) / calibration,
        "stage_ratios": {s: statistics.median(t) / calibration for s, t in stage_times.items()},
        "repeats": repeats,
        "machine": machine_facts(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true")
    action.add_argument("--update-baseline", action="store_true")
    parser.add_argument("--margin", type=float, default=0.30, help="allowed slowdown (0.30 = 30%%)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--out", type=Path, default=None, help="also write this run's figures here")
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=2))
    if args.update_baseline:
        write_text_atomically(args.baseline, json.dumps(result, indent=2) + "\n")
        print(f"baseline written to {args.baseline}: ratio {result['ratio']:.3f}")
        return 0
    if not args.baseline.exists():
        print(f"error: {args.baseline}: no baseline; run with --update-baseline first", file=sys.stderr)
        return 2
    baseline = json.loads(args.baseline.read_text())
    limit = baseline["ratio"] * (1 + args.margin)
    print(f"{'':10s} {'baseline':>9s} {'now':>9s}")
    print(f"{'ratio':10s} {baseline['ratio']:9.3f} {result['ratio']:9.3f}   (limit {limit:.3f})")
    for stage in STAGES:
        print(f"{stage:10s} {baseline['stage_ratios'][stage]:9.3f} {result['stage_ratios'][stage]:9.3f}")
    print(f"pipeline {result['pipeline_s']:.3f} s, calibration {result['calibration_s']:.3f} s")
    if result["ratio"] > limit:
        print(f"error: timing regression: pipeline/calibration ratio {result['ratio']:.3f} exceeds "
              f"baseline {baseline['ratio']:.3f} by more than {args.margin:.0%}", file=sys.stderr)
        return 1
    print("timing check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
