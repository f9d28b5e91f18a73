"""The markdown table of a calibration record (MODEL/inference.json, written by `python -m inference.calibrate`), for
the benchmarks that publish one (calibrate_default_model.py, calibrate_nnunet_model.py)."""
from __future__ import annotations

KEY = ("patch_scale", "step_size", "backend", "crop")


def candidate_key(candidate: dict) -> tuple:
    return tuple(candidate.get(k, "exact" if k == "crop" else None) for k in KEY)


def calibration_lines(record: dict, device: str, model: str) -> list[str]:
    """The candidates' table (the chosen one marked) and a line on the choice."""
    chosen = candidate_key(record["chosen"])
    labels = record["candidates"][0]["mean_lesion_dsc"] is not None
    lines = [f"Rule: {record['rule']}. Reference: nnU-Net's tiling (the training patch, step 0.5, torch) with the exact "
             "crop (nnU-Net's mask inside the body's box, 0 outside). First run's export for ONNX Runtime: "
             f"{record.get('first_run_export_seconds')} s (once per model and machine).", "",
             "| patch x | step | crop | backend | s / case | mean agreement with the reference | lowest | "
             "mean lesion DSC | qualifies |", "|---|---|---|---|---|---|---|---|---|"]
    for c in record["candidates"]:
        backend = "ONNX Runtime" if c["backend"] == "auto" and device == "cpu" else "torch"
        marker = " **chosen**" if candidate_key(c) == chosen else ""
        dsc = f"{c['mean_lesion_dsc']:.4f}" if labels else "-"
        lines.append(f"| {c['patch_scale']:g} | {c['step_size']:g} | {c.get('crop', 'exact')} | {backend}{marker} | "
                     f"{c['seconds_per_case']:.2f} | {c['mean_agreement']:.4f} | {c['min_agreement']:.4f} | {dsc} | "
                     f"{'yes' if c['qualifies'] else 'no'} |")
    reference = record["candidates"][0]
    picked = next(c for c in record["candidates"] if candidate_key(c) == chosen)
    accuracy = (f", mean lesion DSC {picked['mean_lesion_dsc']:.4f} against {reference['mean_lesion_dsc']:.4f}"
                if labels else f", mean agreement {picked['mean_agreement']:.4f}")
    lines += ["", f"Chosen: patch x{chosen[0]:g}, step {chosen[1]:g}, {chosen[3]} crop, backend {chosen[2]}: "
              f"{picked['seconds_per_case']:.2f} s a case against the reference's {reference['seconds_per_case']:.2f} s "
              f"({reference['seconds_per_case'] / picked['seconds_per_case']:.2f}x){accuracy}. Written to "
              f"{model}/inference.json.", ""]
    return lines
