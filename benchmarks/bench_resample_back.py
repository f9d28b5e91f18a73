"""Resampling the prediction back to the original grid: logits (trilinear, then argmax) vs labels
(argmax, then nearest). Speed and agreement on phantoms, both in the same run.

    .venv/bin/python benchmarks/bench_resample_back.py [-m models/default] [--cases 4] [--device cpu]
        [--images DIR --labels DIR]    # real files instead of phantoms, e.g. the parity blob cases

Writes results/resample_back.json and .md.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


from phantoms import generate_phantom
from flare_common.machine import machine_facts
from inference import PredictionSettings, load_model, predict_image_with_report

RESULTS = Path(__file__).resolve().parent.parent / "results"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def cases(args):
    """(image, ground truth) pairs: files from --images/--labels, else lesion phantoms."""
    if args.images:
        for path in sorted(args.images.glob("*_0000.nii.gz"))[: args.cases]:
            label = args.labels / path.name.replace("_0000.nii.gz", ".nii.gz")
            yield sitk.ReadImage(str(path)), sitk.ReadImage(str(label))
        return
    for index in range(args.cases):
        phantom = generate_phantom(args.seed, index, shape_zyx=(args.slices, 512, 512), healthy=False)
        yield phantom.image, phantom.label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="models/default")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=160, help="z size of the phantoms")
    parser.add_argument("--images", type=Path, default=None,
                        help="use these <case>_0000.nii.gz (with --labels) instead of phantoms")
    parser.add_argument("--labels", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model, device=args.device)
    rows = []
    for index, (image, truth_image) in enumerate(cases(args)):
        row = {"case": index, "shape_zyx": list(sitk.GetArrayViewFromImage(image).shape)}
        masks = {}
        for method in ("logits", "labels"):
            start = time.perf_counter()
            mask, report = predict_image_with_report(image, model, PredictionSettings(resample_back=method))
            row[f"{method}_total_s"] = time.perf_counter() - start
            row[f"{method}_export_s"] = report.seconds["export"]
            masks[method] = sitk.GetArrayFromImage(mask).astype(bool)
        truth = sitk.GetArrayFromImage(truth_image).astype(bool)
        row["agreement_dice"] = dice(masks["logits"], masks["labels"])
        row["logits_vs_truth_dice"] = dice(masks["logits"], truth)
        row["labels_vs_truth_dice"] = dice(masks["labels"], truth)
        rows.append(row)
        print(json.dumps(row))
    summary = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]
               if key not in ("case", "shape_zyx")}
    result = {"model": args.model, "device": str(model.device), "rows": rows, "mean": summary,
              "machine": machine_facts(torch_threads=torch.get_num_threads()),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resample_back.json").write_text(json.dumps(result, indent=2))
    lines = ["# Resample back: logits (trilinear, argmax) vs labels (argmax, nearest)", "",
             f"Model `{args.model}`, device {model.device}, {result['date']}, {result['machine']['platform']}.", "",
             "| case | shape | export logits (s) | export labels (s) | agreement DSC | DSC vs truth: logits | labels |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['shape_zyx']))} | {r['logits_export_s']:.3f} | "
                     f"{r['labels_export_s']:.3f} | {r['agreement_dice']:.4f} | "
                     f"{r['logits_vs_truth_dice']:.4f} | {r['labels_vs_truth_dice']:.4f} |")
    m = summary
    lines.append(f"| mean | | {m['logits_export_s']:.3f} | {m['labels_export_s']:.3f} | "
                 f"{m['agreement_dice']:.4f} | {m['logits_vs_truth_dice']:.4f} | {m['labels_vs_truth_dice']:.4f} |")
    (RESULTS / "resample_back.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
