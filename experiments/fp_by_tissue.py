"""Where a model's false positives are: each predicted lesion that touches no true lesion, by the normal
tissue it lies in (the phantoms' tissue map).

    python experiments/fp_by_tissue.py --pred /tmp/eval_default_model/quality_seed7/pred [--seed 7]
                                      [--name main] [--cases healthy_0000 phantom_0003 ...]

The predictions are those of `python benchmarks/eval_default_model.py quality` (its `pred` folder); the
phantoms are generated again with their tissue map, from the same seed and index as eval_default_model's
`phantoms.write_eval_set` uses (phantom_NNNN: index NNNN; healthy_NNNN: index 5000 + NNNN), so the labels
must match the ones the predictions were scored against (checked voxel by voxel). Writes
results/fp_by_tissue_<name>.{json,md,png}: false-positive volume and component count per tissue, and
every component (case, ml, tissue share, median HU, height in the scan).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cc3d
import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from phantoms import HEALTHY_INDEX_BASE
from flare_common.files import write_text_atomically
from flare_common.results import EXPERIMENT_RESULTS, display
from flare_common.machine import machine_facts
from phantoms import TISSUE_NAMES, generate_phantom

REPO = Path(__file__).resolve().parent.parent


def eval_set_job(case: str) -> tuple[int, bool]:
    """(phantom index, healthy) of an eval_default_model case name."""
    kind, number = case.rsplit("_", 1)
    if kind == "healthy":
        return HEALTHY_INDEX_BASE + int(number), True
    if kind == "phantom":
        return int(number), False
    raise ValueError(f"{case}: not a case name of eval_default_model (phantom_NNNN or healthy_NNNN)")


def false_positive_components(prediction: np.ndarray, truth: np.ndarray, tissue: np.ndarray, hu: np.ndarray,
                              voxel_ml: float) -> list[dict]:
    """Predicted components (26-connected) that touch no truth voxel: their volume, majority tissue and
    its share, median HU and relative height (0 = first slice)."""
    labels, count = cc3d.connected_components(prediction, connectivity=26, return_N=True)
    rows = []
    for component, box in enumerate(cc3d.statistics(labels)["bounding_boxes"][1:count + 1], start=1):
        inside = labels[box] == component
        if truth[box][inside].any():
            continue
        classes, counts = np.unique(tissue[box][inside], return_counts=True)
        z_centre = (box[0].start + box[0].stop - 1) / 2
        rows.append({"ml": float(inside.sum() * voxel_ml), "tissue": TISSUE_NAMES[classes[np.argmax(counts)]],
                     "tissue_share": float(counts.max() / inside.sum()),
                     "median_hu": float(np.median(hu[box][inside])),
                     "height": float(z_centre / max(1, prediction.shape[0] - 1))})
    return rows


def markdown(result: dict, by_tissue: pd.DataFrame) -> str:
    lines = [f"# False positives by tissue: {result['name']}", "",
             f"Predictions `{result['pred']}` of {len(result['cases'])} evaluation phantoms (seed "
             f"{result['seed']}); {result['machine']['date']}. Reproduce: `{result['command']}`.", "",
             f"{result['components']} false-positive components, {result['total_ml']:.1f} ml in all.", "",
             "| tissue | ml | components | cases |", "|---|---|---|---|"]
    lines += [f"| {row.tissue} | {row.ml:.1f} | {row.components} | {row.cases} |" for row in by_tissue.itertuples()]
    lines += ["", f"![by tissue](fp_by_tissue_{result['name']}.png)"]
    return "\n".join(lines) + "\n"


def plot(by_tissue: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(by_tissue) + 1.5), constrained_layout=True)
    ax.barh(by_tissue["tissue"][::-1], by_tissue["ml"][::-1], color="tab:red")
    ax.set_xlabel("false-positive volume (ml)")
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", required=True, help="folder of <case>.nii.gz predictions")
    parser.add_argument("--seed", type=int, default=7, help="the seed the evaluation set was generated with")
    parser.add_argument("--labels", default=None,
                        help="the evaluation set's labels (default: next to --pred, ../data/labels)")
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: every prediction)")
    parser.add_argument("--name", default="default_model", help="results/fp_by_tissue_<name>.*")
    parser.add_argument("--results", default=str(EXPERIMENT_RESULTS))
    args = parser.parse_args(argv)
    pred_dir = Path(args.pred)
    labels_dir = Path(args.labels) if args.labels else pred_dir.parent / "data" / "labels"
    cases = args.cases or sorted(p.name[:-len(".nii.gz")] for p in pred_dir.glob("*.nii.gz"))
    if not cases:
        parser.error(f"{pred_dir}: no predictions")
    rows = []
    for case in tqdm(cases, desc="cases", unit="case"):
        index, healthy = eval_set_job(case)
        phantom = generate_phantom(args.seed, index, healthy=healthy, name=case, with_tissue=True)
        truth = sitk.GetArrayFromImage(phantom.label) > 0
        label_path = labels_dir / f"{case}.nii.gz"
        scored = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))) > 0 if label_path.exists() else truth
        if not np.array_equal(truth, scored):
            print(f"error: {label_path}: differs from the regenerated phantom (wrong --seed?)", file=sys.stderr)
            return 1
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}.nii.gz"))) > 0
        voxel_ml = float(np.prod(phantom.image.GetSpacing())) / 1000
        hu = sitk.GetArrayViewFromImage(phantom.image)
        rows += [{"case": case, **row}
                 for row in false_positive_components(prediction, truth, phantom.tissue, hu, voxel_ml)]
        del phantom
    components = pd.DataFrame(rows, columns=["case", "ml", "tissue", "tissue_share", "median_hu", "height"])
    by_tissue = (components.groupby("tissue").agg(ml=("ml", "sum"), components=("ml", "size"),
                                                  cases=("case", "nunique"))
                 .sort_values("ml", ascending=False).reset_index())
    command = (f"python experiments/fp_by_tissue.py --pred {display(pred_dir)} --labels {display(labels_dir)} "
               f"--seed {args.seed} --name {args.name}" + (" --cases " + " ".join(cases) if args.cases else ""))
    result = {"benchmark": "false positives by tissue", "name": args.name, "pred": display(pred_dir),
              "seed": args.seed, "cases": cases, "command": command, "machine": machine_facts(),
              "components": len(components), "total_ml": float(components["ml"].sum()),
              "by_tissue": by_tissue.to_dict(orient="records"),
              "component_rows": components.round(3).to_dict(orient="records")}
    results = Path(args.results)
    write_text_atomically(results / f"fp_by_tissue_{args.name}.json", json.dumps(result, indent=2))
    write_text_atomically(results / f"fp_by_tissue_{args.name}.md", markdown(result, by_tissue))
    plot(by_tissue, results / f"fp_by_tissue_{args.name}.png",
         f"{args.name}: false positives by tissue ({len(cases)} cases, seed {args.seed})")
    print(markdown(result, by_tissue))
    return 0


if __name__ == "__main__":
    sys.exit(main())
