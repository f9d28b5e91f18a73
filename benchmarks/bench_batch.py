"""Throughput on a batch of cases, in cases per hour, each way of running it measured in the same run:

  (a) `python -m inference --sequential`   one process, one case after another (read, compute, write)
  (b) `python -m inference`                 one process, pipelined (inference/batch.py, the default)
  (c) `python -m inference --ray`           Ray on this machine, 2 workers of 1 core, and 1 worker for scale
  (d) `nnUNetv2_predict_from_modelfolder`   nnU-Net 2.8.1 with its default preprocessing / export workers,
                                            TTA off (--disable_tta), with .venv-nnunet's python

each over the same phantoms, whole command (start-up, model load, Ray's start included), the default model.
Masks of (b) and (c) are compared with (a) voxel for voxel. Then a projection, on paper, of a 10,000-case
archive on 8 GPUs from the per-stage times measured on the H200 (results/flare_sizes_default_nvidia-h200_*).

    .venv/bin/python benchmarks/bench_batch.py [--cases 12] [--nnunet-python .venv-nnunet/bin/python]

Writes results/batch_throughput_<machine>_<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_common.files import write_json_atomically, write_text_atomically
from flare_common.machine import cpu_label, machine_facts
from flare_common.results import REPO, RESULTS
from phantoms import write_dataset

SHAPE, SPACING = (64, 192, 192), (4.0, 2.5, 2.5)  # a partial scan at a realistic scale: seconds a case
H200_RESULTS = RESULTS / "flare_sizes_default_nvidia-h200_2026-11-30.json"


def run(label: str, argv: list[str], out: Path) -> dict:
    out.mkdir(parents=True)
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f"bench_batch: {label} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    written = len(list(out.glob("*.nii.gz")))
    print(f"bench_batch: {label}: {seconds:.1f} s, {written} masks", file=sys.stderr)
    return {"label": label, "command": " ".join(map(str, argv)).replace(str(REPO) + "/", ""), "seconds": seconds,
            "masks": written, "returncode": done.returncode}


def same_masks(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.nii.gz"))

    def voxels(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    return names == sorted(p.name for p in b.glob("*.nii.gz")) and all(
        np.array_equal(voxels(a / n), voxels(b / n)) for n in names)


def projection() -> dict | None:
    """10,000 cases on 8 H200s from the per-stage times measured there (one process a case). Pipelined, a GPU's
    case rate is set by the slowest of: the network (the GPU), the CPU-side stages (read/decode, export, write,
    which the pipeline overlaps with the network), and the file system's bandwidth shared by 8 GPUs."""
    if not H200_RESULTS.is_file():
        return None
    rows = [r for r in json.loads(H200_RESULTS.read_text())["rows"] if r.get("engine", "").startswith("ours")]
    network = float(np.mean([r["network_s"] for r in rows]))
    cpu_side = float(np.mean([r.get("read_s", 0) + r.get("crop_s", 0) + r.get("resample_s", 0)
                              + r.get("export_s", 0) + r.get("write_s", 0) for r in rows]))
    per_case = max(network, cpu_side)
    gpus, cases = 8, 10_000
    input_mb = 110.0  # a 512x512x554 .nii.gz; a FLARE case averages less
    hours = cases * per_case / gpus / 3600
    return {"gpus": gpus, "cases": cases, "network_s": network, "cpu_side_s": cpu_side, "per_case_s": per_case,
            "limited_by": "GPU (network)" if network >= cpu_side else "CPU-side stages",
            "hours": hours, "file_system_mb_s": gpus * input_mb / per_case,
            "source": str(H200_RESULTS.relative_to(REPO))}


def markdown(result: dict) -> str:
    machine = result["machine"]
    rows = ["| run | seconds | cases / hour | vs (a) | masks |", "|---|---|---|---|---|"]
    base = result["runs"][0]["seconds"]
    for r in result["runs"]:
        per_hour = result["cases"] * 3600 / r["seconds"]
        same = {True: ", identical to (a)", False: ", DIFFER from (a)", None: ""}[r.get("same_as_sequential")]
        rows.append(f"| {r['label']} | {r['seconds']:.1f} | {per_hour:.0f} | {base / r['seconds']:.2f}x | "
                    f"{r['masks']}{same} |")
    lines = [f"# Batch throughput, {result['cases']} phantoms of {'x'.join(map(str, SHAPE))} voxels",
             "", f"{cpu_label(machine)}, {machine['cores']} cores, {machine['date']}. Command: "
             f"`{result['command']}`. Each run is the whole command (start-up, model load, Ray's own start "
             "included); the machine is shared, so single runs vary by 10-25 %.", "", *rows, ""]
    ray2, ray1 = (next((r for r in result["runs"] if r["label"].startswith(prefix)), None)
                  for prefix in ("(c) Ray, 2", "(c) Ray, 1"))
    if ray2 and ray1:
        lines += [f"Ray with 2 workers against 1: {ray1['seconds'] / ray2['seconds']:.2f}x.", ""]
    p = result.get("projection")
    if p:
        lines += ["## 10,000 cases on 8 GPUs (projection, not a measurement)", "",
                  f"From the H200 measurements (`{p['source']}`, our engine, one process a case): network "
                  f"{p['network_s']:.2f} s a case, CPU-side stages (read, crop, resample, export, write) "
                  f"{p['cpu_side_s']:.2f} s. Pipelined, a worker's case time is the larger, {p['per_case_s']:.2f} s "
                  f"({p['limited_by']}); with the model loaded once the start-up (about 5 s a case in the per-case "
                  f"runs) is gone. 8 workers: about **{p['hours']:.1f} hours** for 10,000 cases, reading about "
                  f"{p['file_system_mb_s']:.0f} MB/s of compressed CT from the shared file system, which a network "
                  "file system must sustain (else it is the limit). The CPU-side stages need a few cores per GPU; "
                  "on the 2-core machine here they compete with the network for the same cores.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--nnunet-python", type=Path, default=REPO / ".venv-nnunet" / "bin" / "python")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        write_dataset(work / "data", args.cases, args.seed, shape_zyx=SHAPE, spacing_zyx=SPACING, progress=False)
        images, engine = work / "data" / "images", [sys.executable, "-m", "inference"]
        common = ["-i", images, "-m", args.model, "--device", "cpu", "--quiet"]
        # warm the ONNX export cache, so that no run pays for the one-off export
        subprocess.run(engine + common + ["-o", work / "warm"], cwd=REPO, capture_output=True)
        runs = [run("(a) sequential CLI", engine + common + ["-o", work / "a", "--sequential"], work / "a"),
                run("(b) pipelined CLI", engine + common + ["-o", work / "b"], work / "b"),
                run("(c) Ray, 2 workers x 1 core", engine + common + ["-o", work / "c2", "--ray", "--journal",
                                                                      work / "c2.jsonl"], work / "c2"),
                run("(c) Ray, 1 worker x 1 core", engine + common + ["-o", work / "c1", "--ray", "--ray-workers", "1",
                                                                     "--journal", work / "c1.jsonl"], work / "c1")]
        for r, folder in zip(runs[1:], ("b", "c2", "c1")):
            r["same_as_sequential"] = same_masks(work / "a", work / folder)
        if args.nnunet_python.is_file():
            predict = args.nnunet_python.parent / "nnUNetv2_predict_from_modelfolder"
            runs.append(run("(d) nnUNetv2_predict, its default workers, TTA off",
                            [predict, "-i", images, "-o", work / "d", "-m", args.model, "-f", "all", "--disable_tta",
                             "-device", "cpu", "--disable_progress_bar"], work / "d"))
        result = {"machine": machine_facts(), "cases": args.cases, "shape_zyx": list(SHAPE),
                  "spacing_zyx": list(SPACING), "seed": args.seed,
                  "command": "python benchmarks/bench_batch.py " + " ".join(sys.argv[1:]), "runs": runs,
                  "projection": projection()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stem = args.results / f"batch_throughput_{result['machine']['date'][:10]}"
    write_json_atomically(stem.with_suffix(".json"), result)
    write_text_atomically(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
