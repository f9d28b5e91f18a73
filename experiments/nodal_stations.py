"""Lymph-node lesions before and after nodal stations (phantom generator version 1 -> 2): where they lie,
what lies next to them, and slices through them, for one seed's cases.

    python experiments/nodal_stations.py [--seed 8] [--cases 40] [--before 23981b0]
        [--figure docs/images/nodal_stations_before_after.png] [--out experiments/results/nodal_stations]

The generator of commit --before (version 1: nodes anywhere in the visceral fat) runs from a temporary git
worktree in a subprocess of this script, the current one here; both generate lesion cases 0..N-1 of --seed
at the default 512x512xN geometry. For every lymph-node lesion, in a box of +-BOX_MM around it: the
distance (mm) from the lesion to the nearest bowel voxel and to the nearest vessel voxel (Euclidean
distance transforms with the voxel spacing), its diameter and mean HU; per seed, how many lesions of each
type and how many cases hold only lymph nodes. Writes OUT.{json,md} and the figure (axial slices through
the first nodal lesions of each generator, soft-tissue window, the lesion outlined).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BOX_MM = 80.0       # half side of the box around a lesion: distances beyond it are reported as >= BOX_MM
SLICES_SHOWN = 4
BOWEL_NEAR_MM = 5.0
VESSEL_NEAR_MM = 15.0


def nodal_lesion_facts(seed: int, cases: int) -> tuple[dict, dict]:
    """Statistics of the importable `phantoms` (whichever generator version that is) and the crops shown."""
    from scipy import ndimage
    import SimpleITK as sitk
    import phantoms

    bowel, vessel = phantoms.TISSUE_NAMES.index("bowel"), phantoms.TISSUE_NAMES.index("vessel")
    types, node_only, nodes, crops = Counter(), 0, [], []
    for index in range(cases):
        case = phantoms.generate_phantom(seed, index, healthy=False, with_tissue=True)
        lesions = case.info["lesions"]
        types.update(lesion["type"] for lesion in lesions)
        node_only += bool(lesions) and all(lesion["type"] == "lymph_node" for lesion in lesions)
        if not any(lesion["type"] == "lymph_node" for lesion in lesions):
            continue
        hu = sitk.GetArrayFromImage(case.image)
        spacing = np.array(case.info["spacing_zyx"])
        reach = np.ceil(BOX_MM / spacing).astype(int)
        for lesion in (les for les in lesions if les["type"] == "lymph_node"):
            centre = np.array(lesion["centre_index_zyx"])
            box = tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(centre, reach))
            tissue = case.tissue[box]
            inside = tissue == phantoms.LESION
            # the lesion painted at this centre: its connected piece (other lesions may share the box)
            pieces, _ = ndimage.label(inside)
            own = pieces == pieces[tuple(centre - [b.start for b in box])]
            facts = dict(case=case.info["case"], diameter_mm=lesion["diameter_mm"],
                         mean_hu=round(float(hu[box][own].mean()), 1))
            for name, tissue_class in (("bowel", bowel), ("vessel", vessel)):
                present = tissue == tissue_class
                nearest = ndimage.distance_transform_edt(~present, sampling=spacing)[own].min() \
                    if present.any() else BOX_MM
                facts[f"{name}_mm"] = round(min(float(nearest), BOX_MM), 1)  # beyond the box: not looked at
            nodes.append(facts)
            if len(crops) < SLICES_SHOWN and all(c["case"] != case.info["case"] for c in crops):
                z, y, x = centre
                half = np.ceil(BOX_MM / spacing[1:]).astype(int)
                rows = slice(max(0, y - half[0]), y + half[0])
                cols = slice(max(0, x - half[1]), x + half[1])
                # every crop as a radiologist sees an axial slice (anterior up, the patient's right on the left):
                # the phantoms' directions flip x or y in some cases, and the raw array would show those mirrored
                direction = np.asarray(case.image.GetDirection()).reshape(3, 3)
                view = (slice(None, None, -1 if direction[1, 1] < 0 else 1),
                        slice(None, None, -1 if direction[0, 0] < 0 else 1))
                crops.append(dict(case=case.info["case"], hu=hu[z, rows, cols][view].tolist(),
                                  label=(case.tissue[z, rows, cols] == phantoms.LESION)[view].astype(int).tolist(),
                                  diameter_mm=lesion["diameter_mm"], spacing=spacing[1:].tolist()))
    version = getattr(phantoms, "GENERATOR_VERSION", None)
    summary = dict(generator_version=version, seed=seed, cases=cases, lesion_types=dict(sorted(types.items())),
                   lymph_node_only_cases=node_only, lymph_nodes=nodes)
    return summary, dict(crops=crops)


def run_before(commit: str, seed: int, cases: int) -> tuple[dict, dict]:
    """nodal_lesion_facts for the generator of `commit`, from a temporary worktree in a subprocess."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
        try:
            result = Path(scratch) / "before.json"
            # its `phantoms` before the installed one
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
            subprocess.run([sys.executable, __file__, "--facts-only", str(result), "--seed", str(seed),
                            "--cases", str(cases)], cwd=scratch, env=env, check=True)
            data = json.loads(result.read_text())
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    return data["summary"], data["shown"]


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 1) if values else None


def describe(summary: dict) -> dict:
    nodes = summary["lymph_nodes"]

    def share(test):
        return round(float(np.mean([test(n) for n in nodes])), 3) if nodes else None
    return dict(generator_version=summary["generator_version"], lesions=sum(summary["lesion_types"].values()),
                lesion_types=summary["lesion_types"], lymph_node_only_cases=summary["lymph_node_only_cases"],
                lymph_nodes=len(nodes),
                median_diameter_mm=median([n["diameter_mm"] for n in nodes]),
                median_mean_hu=median([n["mean_hu"] for n in nodes]),
                bowel_within_5mm=share(lambda n: n["bowel_mm"] <= BOWEL_NEAR_MM),
                vessel_within_15mm=share(lambda n: n["vessel_mm"] <= VESSEL_NEAR_MM),
                median_bowel_mm=median([n["bowel_mm"] for n in nodes]),
                median_vessel_mm=median([n["vessel_mm"] for n in nodes]))


def markdown(before: dict, after: dict, args, figure: str) -> str:
    rows = [("lesions (all types)", "lesions"), ("lymph-node lesions", "lymph_nodes"),
            ("cases whose lesions are all lymph nodes", "lymph_node_only_cases"),
            ("median node diameter (mm)", "median_diameter_mm"), ("median node HU", "median_mean_hu"),
            (f"nodes with bowel within {BOWEL_NEAR_MM:g} mm", "bowel_within_5mm"),
            (f"nodes with a vessel within {VESSEL_NEAR_MM:g} mm", "vessel_within_15mm"),
            ("median distance to bowel (mm)", "median_bowel_mm"),
            ("median distance to a vessel (mm)", "median_vessel_mm")]
    lines = ["# Lymph-node lesions before and after nodal stations", "",
             f"Seed {args.seed}, lesion cases 0..{args.cases - 1} at the default 512x512xN geometry. "
             f"Before: generator version {before['generator_version'] or 1} (commit {args.before}); after: "
             f"version {after['generator_version']}. Distances from the lesion to the nearest voxel of the "
             f"tissue map's class, within +-{BOX_MM:g} mm ({BOX_MM:g} = none there).", "",
             f"Reproduce: `python experiments/nodal_stations.py --seed {args.seed} --cases {args.cases} "
             f"--before {args.before}`. Figure: `{figure}`.", "",
             "| | before | after |", "|---|---|---|"]
    lines += [f"| {title} | {before[key]} | {after[key]} |" for title, key in rows]
    kinds = sorted(set(before["lesion_types"]) | set(after["lesion_types"]))
    lines += ["", "| lesion type | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {before['lesion_types'].get(k, 0)} | {after['lesion_types'].get(k, 0)} |" for k in kinds]
    return "\n".join(lines) + "\n"


def plot(shown: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(shown), SLICES_SHOWN, figsize=(3.2 * SLICES_SHOWN, 3.9 * len(shown)),
                                squeeze=False)
    for row, (title, data) in enumerate(shown):
        for column in range(SLICES_SHOWN):
            axis = axes[row, column]
            axis.axis("off")
            if column >= len(data["crops"]):
                continue
            crop = data["crops"][column]
            extent = (0, len(crop["hu"][0]) * crop["spacing"][1], len(crop["hu"]) * crop["spacing"][0], 0)
            axis.imshow(np.array(crop["hu"]), cmap="gray", vmin=-160, vmax=240, extent=extent)
            axis.contour(np.array(crop["label"]), [0.5], colors="red", linewidths=2.0, extent=extent,
                         origin="upper")
            for x, y, letter, ha, va in ((0.02, 0.5, "R", "left", "center"), (0.98, 0.5, "L", "right", "center"),
                                         (0.5, 0.98, "A", "center", "top"), (0.5, 0.02, "P", "center", "bottom")):
                axis.text(x, y, letter, transform=axis.transAxes, ha=ha, va=va, color="yellow", fontsize=8,
                          fontweight="bold")
            axis.set_title(f"{title}\n{crop['case']}, node {crop['diameter_mm']:.0f} mm", fontsize=8)
    figure.suptitle("Lymph-node lesions (red outline), axial slice through the centre, window level 40, width 400 HU",
                    fontsize=10)
    figure.tight_layout(h_pad=2.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--cases", type=int, default=40, help="lesion cases of the seed")
    parser.add_argument("--before", default="23981b0", help="a commit with the earlier generator")
    parser.add_argument("--figure", default="docs/images/nodal_stations_before_after.png")
    parser.add_argument("--out", default="experiments/results/nodal_stations")
    parser.add_argument("--facts-only", metavar="JSON", help=argparse.SUPPRESS)  # the subprocess's job
    args = parser.parse_args(argv)
    if args.facts_only:
        summary, shown = nodal_lesion_facts(args.seed, args.cases)
        Path(args.facts_only).write_text(json.dumps(dict(summary=summary, shown=shown)))
        return 0
    before_summary, before_shown = run_before(args.before, args.seed, args.cases)
    after_summary, after_shown = nodal_lesion_facts(args.seed, args.cases)
    before, after = describe(before_summary), describe(after_summary)
    figure = Path(args.figure)
    plot([("before: anywhere in fat", before_shown), ("after: nodal stations", after_shown)], REPO / figure)
    from flare_common.files import write_text_atomically

    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out.with_suffix(".json"), json.dumps(
        dict(before=before, after=after, before_nodes=before_summary["lymph_nodes"],
             after_nodes=after_summary["lymph_nodes"]), indent=1))
    write_text_atomically(out.with_suffix(".md"), markdown(before, after, args, str(figure)))
    print(markdown(before, after, args, str(figure)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
