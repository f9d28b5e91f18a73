"""The exact crop against no crop and against the crop it replaced: agreement, accuracy and time, in one run.

    .venv/bin/python benchmarks/bench_exact_crop.py --before COMMIT [--cases 4] [--seed 29]

Cases: `--cases` full-size phantoms of a seed nobody trains or tunes on (models/default: trained on 1000, validated
on 8, scored on 7), all with lesions, and the 554-slice FLARE efficiency phantom. Each setting is one `python -m
inference --sequential` run on the CPU (`--backend auto`: ONNX Runtime; the patch x1.2, step 0.5 in all three) over
all cases:
- `exact crop`: this tree's default (the whole volume tiled as without a crop, only the body's windows run);
- `no crop`: this tree with `--no-crop` (nnU-Net's tiling of the whole volume);
- `bbox crop (before)`: the commit `--before`, whose crop cut the volume to the body box and tiled the cut.
Per case: DSC of each cropped mask against the no-crop mask (the agreement), lesion DSC against the phantom's label,
and the engine's own seconds for the case (read to write, --timings). Writes results/exact_crop_<device>_<date>.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_common.machine import machine_facts
from flare_common.results import REPO, display, write_result
from phantoms import generate_flare_case, generate_phantom, write_case

# the same patch and step in every run (the earlier commit's defaults), so that only the crop differs
SAME = ["--patch-scale", "1.2", "--step-size", "0.5", "--backend", "auto"]
SETTINGS = {"exact crop": ("after", SAME), "no crop": ("after", [*SAME, "--no-crop"]),
            "bbox crop (before)": ("before", SAME)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int(np.logical_and(a, b).sum()) / total


def run(tree: Path, images: Path, out: Path, flags: list[str], timings: Path) -> None:
    command = [sys.executable, "-m", "inference", "-i", str(images), "-o", str(out), "--device", "cpu", "--sequential",
               "--quiet", "--timings", str(timings), *flags]
    done = subprocess.run(command, cwd=tree, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree),
                                                   "HOME": str(Path.home())}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_exact_crop: {' '.join(command)} failed in {tree}:\n{done.stderr[-2000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit whose crop is compared (the one before the change)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=29)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", args.before], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="exact-crop-") as scratch:
        scratch = Path(scratch)
        before = scratch / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), commit], cwd=REPO, check=True,
                       capture_output=True)
        try:
            data = scratch / "data"
            names = []
            for index in range(args.cases):
                names.append(write_case(generate_phantom(args.seed, index, healthy=False), data)["case"])
            names.append(write_case(generate_flare_case(args.seed, 554, healthy_fraction=0.0), data)["case"])
            masks, seconds = {}, {}
            for label, (which, flags) in SETTINGS.items():
                out, timings = scratch / "out" / label.replace(" ", "_"), scratch / f"{label.replace(' ', '_')}.json"
                run(before if which == "before" else REPO, data / "images", out, flags, timings)
                report = json.loads(timings.read_text())["cases"]
                for name in names:
                    masks[label, name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}.nii.gz"))) > 0
                    seconds[label, name] = report[f"{name}_0000.nii.gz"]["total"]
            rows = []
            for name in names:
                truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labels" / f"{name}.nii.gz"))) > 0
                shape = "x".join(map(str, truth.shape))
                row = {"case": name, "shape_zyx": shape}
                for label in SETTINGS:
                    row[f"{label}: agreement with no crop"] = round(dice(masks[label, name], masks["no crop", name]), 4)
                    row[f"{label}: lesion DSC"] = round(dice(masks[label, name], truth), 4)
                    row[f"{label}: seconds"] = round(seconds[label, name], 2)
                rows.append(row)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    largest = rows[-1]
    gain_before = largest["no crop: seconds"] - largest["bbox crop (before): seconds"]
    gain_exact = largest["no crop: seconds"] - largest["exact crop: seconds"]
    machine = machine_facts()
    command = f".venv/bin/python {display(__file__)} --before {args.before} --cases {args.cases} --seed {args.seed}"
    result = {"machine": machine, "command": command, "before": commit, "rows": rows,
              "crop_gain_s_554": {"bbox crop (before)": round(gain_before, 2), "exact crop": round(gain_exact, 2),
                                  "share_of_the_earlier_gain": round(gain_exact / gain_before, 3) if gain_before else None},
              "min_agreement_exact": min(r["exact crop: agreement with no crop"] for r in rows)}
    lines = [f"# The exact crop against no crop and the bounding-box crop of {commit[:10]}", "",
             f"Machine: {machine['cpu']}, {machine['date'][:10]}, CPU, `--backend auto` (ONNX Runtime), patch x1.2, step 0.5, "
             "`--sequential`. "
             f"Command: `{command}`", "",
             f"{args.cases} full-size phantoms of seed {args.seed} (with lesions) and the 554-slice FLARE phantom, "
             "`models/default`.", "",
             "| case | shape (z y x) | setting | agreement with no crop (DSC) | lesion DSC | seconds |", "|---|---|---|---|---|---|"]
    for row in rows:
        for label in SETTINGS:
            lines.append(f"| {row['case']} | {row['shape_zyx']} | {label} | {row[f'{label}: agreement with no crop']} | "
                         f"{row[f'{label}: lesion DSC']} | {row[f'{label}: seconds']} |")
    mean = {label: np.mean([r[f"{label}: lesion DSC"] for r in rows[:-1]]) for label in SETTINGS}
    lines += ["", "Mean lesion DSC over the seed's phantoms: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()) + ".",
              f"Lowest agreement of the exact crop with no crop: {result['min_agreement_exact']}.",
              f"Time the crop saves on the 554-slice phantom: bounding-box crop {gain_before:.2f} s, exact crop "
              f"{gain_exact:.2f} s ({result['crop_gain_s_554']['share_of_the_earlier_gain']} of the earlier gain).", ""]
    result["mean_lesion_dsc"] = {k: round(float(v), 4) for k, v in mean.items()}
    stem = write_result("exact_crop", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {display(stem)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
