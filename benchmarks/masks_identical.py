"""Masks of the engine at an earlier commit against the working tree's, byte for byte, on phantoms: the check that
a change meant to leave behaviour alone (a refactor) did.

    .venv/bin/python benchmarks/masks_identical.py --before COMMIT [--cases 4] [--seed 11]

Both trees run `python -m inference` on the CPU, once with `--backend torch` and once with `--backend auto` (ONNX
Runtime, on an export each tree makes itself with its own exporter, into a cache of its own), with the same
interpreter, on the same phantoms. Every mask file is compared byte for byte (its header, and so its provenance note, included), then
voxel for voxel. Writes results/masks_identical_<device>_<date>.json and .md; exit code 1 where any mask differs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_common.machine import machine_facts
from flare_common.results import REPO, display, write_result

BACKENDS = ("torch", "auto")  # auto on the CPU: ONNX Runtime


def run(command: list[str], cwd: Path, env: dict | None = None) -> None:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"masks_identical: {' '.join(command)} failed in {cwd}:\n{done.stderr.strip()[-2000:]}")


def predict(tree: Path, images: Path, out: Path, backend: str, cache: Path) -> float:
    """The tree's engine on every image; seconds taken (auto: the tree's own export first, into `cache`)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree), "FLARE_CACHE_DIR": str(cache), "HOME": str(cache)}
    started = time.perf_counter()
    run([sys.executable, "-m", "inference", "-i", str(images), "-o", str(out), "-m", str(tree / "models" / "default"),
         "--device", "cpu", "--backend", backend, "--quiet"], tree, env)
    return time.perf_counter() - started


def compare(before: Path, after: Path) -> dict:
    """Per mask: whether the files are the same bytes, and how many voxels differ."""
    rows = {}
    for mask in sorted(before.glob("*.nii.gz")):
        other = after / mask.name
        if not other.is_file():
            rows[mask.name] = {"bytes_identical": False, "voxels_differing": None, "note": "missing after"}
            continue
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(other)))
        rows[mask.name] = {"bytes_identical": mask.read_bytes() == other.read_bytes(),
                           "voxels_differing": int(np.count_nonzero(a != b)) if a.shape == b.shape else None,
                           "lesion_voxels": int(a.sum())}
    for mask in sorted(after.glob("*.nii.gz")):
        rows.setdefault(mask.name, {"bytes_identical": False, "voxels_differing": None, "note": "missing before"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. the one before a refactor)")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 160, 160))
    parser.add_argument("--spacing", type=float, nargs=3, default=(4.0, 2.5, 2.5))
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", args.before], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if not commit:
        sys.exit(f"masks_identical: {args.before}: not a commit of this repository")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="masks-identical-") as scratch:
        scratch = Path(scratch)
        earlier = scratch / "before"
        run(["git", "worktree", "add", "--detach", str(earlier), commit], REPO)
        try:
            run([sys.executable, "-m", "phantoms", "--out", str(scratch / "data"), "--cases", str(args.cases),
                 "--seed", str(args.seed), "--shape", *map(str, args.shape), "--spacing", *map(str, args.spacing),
                 "--healthy-fraction", "0", "--no-progress"], REPO)
            images, results, seconds = scratch / "data" / "images", {}, {}
            for backend in BACKENDS:
                for name, tree in (("before", earlier), ("after", REPO)):
                    seconds[f"{backend}/{name}"] = round(predict(tree, images, scratch / name / backend, backend,
                                                                 scratch / "cache" / name / backend), 2)
                results[backend] = compare(scratch / "before" / backend, scratch / "after" / backend)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=REPO, capture_output=True)
    identical = all(row["bytes_identical"] for rows in results.values() for row in rows.values())
    machine = machine_facts()
    command = (f".venv/bin/python {display(__file__)} --before {args.before} --cases {args.cases} --seed {args.seed} "
               f"--shape {' '.join(map(str, args.shape))} --spacing {' '.join(map(str, args.spacing))}")
    result = {"machine": machine, "command": command, "before": commit, "after": head,
              "after_has_uncommitted_changes": bool(subprocess.run(
                  ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                  text=True).stdout.strip()),
              "phantoms": {"cases": args.cases, "seed": args.seed, "shape": list(args.shape),
                           "spacing": list(args.spacing)},
              "seconds": seconds, "masks": results, "all_bytes_identical": identical}
    lines = [f"# Masks before and after: {commit[:10]} against {head[:10]}"
             f"{' + uncommitted changes' if result['after_has_uncommitted_changes'] else ''}", "",
             f"Machine: {machine['cpu']}, {datetime.now(timezone.utc):%Y-%m-%d}. Command: `{command}`", "",
             f"{args.cases} phantoms ({'x'.join(map(str, args.shape))} voxels of "
             f"{'x'.join(map(str, args.spacing))} mm, seed {args.seed}), `models/default` on the CPU.", "",
             "| backend | mask | same bytes | voxels differing | lesion voxels |", "|---|---|---|---|---|"]
    for backend, rows in results.items():
        for name, row in rows.items():
            lines.append(f"| {backend} | {name} | {'yes' if row['bytes_identical'] else 'NO'} | "
                         f"{row['voxels_differing']} | {row.get('lesion_voxels', '')} |")
    lines += ["", f"All masks byte-identical: **{'yes' if identical else 'NO'}**.", ""]
    stem = write_result("masks_identical", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {display(stem)}.json and .md")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
