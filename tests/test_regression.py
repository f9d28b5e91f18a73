"""The CI timing check fails on a slowdown beyond the margin and passes within it."""
import json

from evaluation import regression


def write_baseline(path, ratio):
    stages = {stage: 0.1 for stage in regression.STAGES}
    path.write_text(json.dumps({"ratio": ratio, "stage_ratios": stages}))


def test_check_fails_when_slower_than_baseline_and_passes_otherwise(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    write_baseline(baseline, 1e-3)  # no real pipeline is 1000x faster than the calibration
    assert regression.main(["--check", "--repeats", "1", "--baseline", str(baseline)]) == 1
    assert "timing regression" in capsys.readouterr().err
    write_baseline(baseline, 1e3)
    out = tmp_path / "run.json"
    assert regression.main(["--check", "--repeats", "1", "--baseline", str(baseline), "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["ratio"] > 0 and set(run["stage_ratios"]) == set(regression.STAGES)


def test_missing_baseline_is_an_error(tmp_path):
    assert regression.main(["--check", "--repeats", "1", "--baseline", str(tmp_path / "none.json")]) == 2
