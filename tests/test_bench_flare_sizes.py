"""benchmarks/bench_flare_sizes.py: the harness run per engine, stage timings joined in, subsets, the plot."""
import json

import numpy as np
import SimpleITK as sitk

from benchmarks.bench_flare_sizes import case_subset, plot, run_harness

# Stands in for an engine: copies the image as its "mask" and writes a timings file as our CLI does.
FAKE_ENGINE = ('f=$(ls "$INPUT_DIR"); cp "$INPUT_DIR/$f" "$OUTPUT_DIR/${f%_0000.nii.gz}.nii.gz" && '
               'printf \'{"cases": {"%s": {"read": 0.5, "network": 1.25, "patch_size": [48, 48, 48], '
               '"predicted_gpu_peak_mb": 3000}}, "model_load_s": 0.1}\' "$f" > "@TIMINGS@/$f.json"')


def write_cases(folder, slices=(10, 20)):
    folder.mkdir(parents=True)
    for n in slices:
        image = sitk.GetImageFromArray(np.zeros((n, 8, 8), np.int16))
        sitk.WriteImage(image, str(folder / f"flare_z{n:03d}_0000.nii.gz"))
    return folder


def test_harness_rows_carry_each_cases_stage_timings_patch_and_predicted_peak(tmp_path):
    images = write_cases(tmp_path / "images")
    table = run_harness(images, FAKE_ENGINE, tmp_path / "run", None, timeout=60)
    assert list(table["status"]) == ["ok", "ok"]
    assert list(table["read_s"]) == [0.5, 0.5] and list(table["network_s"]) == [1.25, 1.25]
    assert list(table["patch_size"]) == ["48x48x48"] * 2
    assert list(table["predicted_gpu_peak_mb"]) == [3000, 3000]  # MB keep their name, seconds get _s
    assert list(table["model_load_s"]) == [0.1, 0.1]
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["n_failed"] == 0


def test_a_subset_links_only_the_named_cases_and_the_plot_is_written(tmp_path):
    images = write_cases(tmp_path / "images", slices=(10, 20, 30))
    subset = case_subset(images, ["flare_z010", "flare_z030"], tmp_path / "subset")
    assert sorted(p.name for p in subset.iterdir()) == ["flare_z010_0000.nii.gz", "flare_z030_0000.nii.gz"]
    assert case_subset(images, None, tmp_path / "unused") == images
    table = run_harness(subset, FAKE_ENGINE, tmp_path / "run", None, timeout=60)
    table.insert(0, "engine", "fake")
    plot(table, tmp_path / "plot.png", "fake engine")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
