"""Calibrating a model folder and publishing its record (MODEL/inference.json, written by `python -m
inference.calibrate`) as a results file, for the benchmarks that do (calibrate_default_model.py,
calibrate_nnunet_model.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flare_common.machine import machine_facts
from flare_common.results import REPO, display, write_result
from inference.model import CALIBRATION_FILE, read_records

KEY = ("patch_scale", "step_size", "backend", "crop", "precision")


def candidate_key(candidate: dict, device: str) -> tuple:
    """What a candidate ran; a record of an engine before 0.22 / 0.23 measured the exact crop, and on CUDA fp16."""
    before = {"crop": "exact", "precision": "fp16" if device == "cuda" else "fp32"}
    return tuple(candidate.get(k, before.get(k)) for k in KEY)


def calibration_lines(record: dict, device: str, model: str) -> list[str]:
    """The candidates' table (the chosen one marked) and a line on the choice."""
    chosen = candidate_key(record["chosen"], device)
    labels = record["candidates"][0]["mean_lesion_dsc"] is not None
    lines = [f"Rule: {record['rule']}. Reference: nnU-Net's tiling (the training patch, step 0.5, torch) with the exact "
             "crop (nnU-Net's mask inside the body's box, 0 outside). First run's export for ONNX Runtime: "
             f"{record.get('first_run_export_seconds')} s (once per model and machine).", "",
             "| patch x | inference patch | step | crop | backend | s / case | mean agreement with the reference | "
             "lowest | mean lesion DSC | qualifies |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in record["candidates"]:
        backend = ("ONNX Runtime" if c["backend"] == "auto" and device == "cpu"
                   else f"torch {candidate_key(c, device)[4]}")
        marker = " **chosen**" if candidate_key(c, device) == chosen else ""
        dsc = f"{c['mean_lesion_dsc']:.4f}" if labels else "-"
        patch = "x".join(map(str, c["inference_patch"])) if c.get("inference_patch") else "-"
        if c.get("same_as") is not None:
            patch += f" (as x{c['same_as']:g}: not run again)"
        lines.append(f"| {c['patch_scale']:g} | {patch} | {c['step_size']:g} | {c.get('crop', 'exact')} | "
                     f"{backend}{marker} | {c['seconds_per_case']:.2f} | {c['mean_agreement']:.4f} | "
                     f"{c['min_agreement']:.4f} | {dsc} | {'yes' if c['qualifies'] else 'no'} |")
    reference = record["candidates"][0]
    picked = next(c for c in record["candidates"] if candidate_key(c, device) == chosen)
    accuracy = (f", mean lesion DSC {picked['mean_lesion_dsc']:.4f} against {reference['mean_lesion_dsc']:.4f}"
                if labels else f", mean agreement {picked['mean_agreement']:.4f}")
    lines += ["", f"Chosen: patch x{chosen[0]:g}, step {chosen[1]:g}, {chosen[3]} crop, backend {chosen[2]} "
              f"({chosen[4]}): "
              f"{picked['seconds_per_case']:.2f} s a case against the reference's {reference['seconds_per_case']:.2f} s "
              f"({reference['seconds_per_case'] / picked['seconds_per_case']:.2f}x){accuracy}. Written to "
              f"{model}/inference.json as its {device} record.", ""]
    return lines


def calibrate(model: Path, data: Path, device: str, flags: tuple[str, ...] = (), caller: str = "calibration") -> dict:
    """Run `python -m inference.calibrate` on `model` with data/images and data/labels; its record for `device`.
    Leaves the process with the calibration's last output where it fails."""
    done = subprocess.run([sys.executable, "-m", "inference.calibrate", "-m", str(model), *flags, "--images",
                           str(data / "images"), "--labels", str(data / "labels"), "--device", device],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{caller}: the calibration failed:\n{done.stderr[-2000:]}")
    return read_records(model / CALIBRATION_FILE)[device]


def publish(name: str, title: str, script: str, arguments: str, record: dict, device: str, model_label: str,
            description: str, **extra) -> int:
    """results/<name>_<device>_<date>.{json,md}: the machine, the command (`script` and its `arguments`), the record
    and `extra`; the markdown under `title` with `description` and the candidates' table. Printed too."""
    machine = machine_facts()
    command = f".venv/bin/python {display(script)} {arguments}"
    result = {"machine": machine, "command": command, "record": record, **extra}
    lines = [title, "", f"Machine: {machine['cpu']}, {machine['date'][:10]}. Command: `{command}`", "", description,
             *calibration_lines(record, device, model_label)]
    stem = write_result(name, result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {display(stem)}.json and .md")
    return 0
