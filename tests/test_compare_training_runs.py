"""experiments/compare_training_runs.py: training runs and their validation scores side by side."""
import json

import pytest

from experiments.compare_training_runs import main


def write_run(folder, name, dsc, seed=8, steps=100, per_case=()):
    metrics = dict(lesion_cases=4, healthy_cases=2, lesion_dsc_mean=dsc, lesion_dsc_median=dsc,
                   lesion_nsd_mean=dsc / 2, lesion_recall_mean=0.5, lesion_precision_mean=0.25,
                   lymph_node_only_dsc_mean=0.3, healthy_fp_volume_ml_mean=12.5, healthy_fp_rate=1.0)
    validation, log = folder / f"{name}_validation.json", folder / f"{name}_log.json"
    rows = [{"case": case, "Lesion_DSC": value, "gt_lesions": 0 if case.startswith("healthy") else 1}
            for case, value in per_case]
    validation.write_text(json.dumps({"eval_seed": seed, "metrics": metrics, "per_case": rows}))
    log.write_text(json.dumps({"command": f"train_default.py --out {name}", "steps": steps, "train_seconds": 600,
                               "final_loss": 0.75, "loss_curve": [[50, 300.0, 1.0], [100, 600.0, 0.75]]}))
    return str(validation), str(log)


def test_runs_are_tabled_and_plotted(tmp_path):
    out = tmp_path / "runs"
    before = [("p0", 0.2), ("p1", 0.5), ("p2", 0.8), ("healthy_0", 0.0)]
    after = [("p0", 0.5), ("p1", 0.5), ("p2", 0.7), ("healthy_0", 0.0)]  # +0.3, 0, -0.1
    assert main(["--run", "one hour", *write_run(tmp_path, "a", 0.4, per_case=before),
                 "--run", "two hours", *write_run(tmp_path, "b", 0.5, steps=200, per_case=after),
                 "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| one hour | 100 | 10.0 | 0.750 | 0.400 | 0.400 | 0.200 | 0.500 | 0.250 | 0.300 | 12.500 | 1.000 |" in table
    assert "| two hours | 200 |" in table and "`train_default.py --out b`" in table
    # the healthy case is not a lesion case; s.e. = std(0.3, 0, -0.1) / sqrt(3) = 0.2082 / 1.732
    assert "| two hours | 3 | +0.067 | 0.120 | 1 / 1 |" in table
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert [r["scores"]["lesion_dsc_mean"] for r in runs] == [0.4, 0.5]
    assert runs[1]["paired_dsc_change"]["better"] == 1 and "paired_dsc_change" not in runs[0]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_runs_scored_on_different_cases_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="seed 7"):
        main(["--run", "a", *write_run(tmp_path, "a", 0.4), "--run", "b", *write_run(tmp_path, "b", 0.5, seed=7),
              "--out", str(tmp_path / "runs")])
    assert not (tmp_path / "runs.md").exists()


def test_an_unreadable_run_is_named(tmp_path):
    validation, _ = write_run(tmp_path, "a", 0.4)
    with pytest.raises(SystemExit, match="broken: cannot read"):
        main(["--run", "broken", validation, str(tmp_path / "missing.json"), "--out", str(tmp_path / "runs")])
