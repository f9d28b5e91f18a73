"""The CI timing check fails on a slowdown beyond the margin and passes within it."""
import json

from evaluation import regression


def write_baseline(path, ratio):
    stages = {stage: 0.1 for stage in regression.STAGES}
    path.write_text(json.dumps({"ratio": ratio, "stage_ratios": stages}))


def test_the_margin_is_where_the_check_turns(tmp_path, monkeypatch, capsys):
    """A run 30 % slower than the baseline is at the default margin's edge: a hair either side decides."""
    measured = {"ratio": 1.3, "stage_ratios": {stage: 0.1 for stage in regression.STAGES}, "pipeline_s": 0.4,
                "calibration_s": 0.3}
    monkeypatch.setattr(regression, "measure", lambda repeats: measured)
    baseline = tmp_path / "baseline.json"
    write_baseline(baseline, 0.999)
    assert regression.main(["--check", "--baseline", str(baseline)]) == 1
    assert "exceeds baseline 0.999 by more than 30%" in capsys.readouterr().err
    write_baseline(baseline, 1.001)
    assert regression.main(["--check", "--baseline", str(baseline)]) == 0
    write_baseline(baseline, 1.001 * 1.3 / 1.5)
    assert regression.main(["--check", "--baseline", str(baseline), "--margin", "0.5"]) == 0
    assert regression.main(["--check", "--baseline", str(baseline), "--margin", "0.4"]) == 1


def test_the_check_on_the_real_pipeline_with_baselines_set_from_its_own_ratio(tmp_path, monkeypatch, capsys):
    """The pipeline's own measured ratio (one real measurement), then the check against a baseline 1.5x under
    what the margin allows (fails) and one 1.5x over the ratio (passes): a check whose margin were wrong would
    give the other answer. The same measurement is used for both, so the machine's noise cannot decide."""
    out, baseline = tmp_path / "run.json", tmp_path / "baseline.json"
    write_baseline(baseline, 1e3)
    assert regression.main(["--check", "--repeats", "1", "--baseline", str(baseline), "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["ratio"] > 0 and set(run["stage_ratios"]) == set(regression.STAGES)
    monkeypatch.setattr(regression, "measure", lambda repeats: run)
    write_baseline(baseline, run["ratio"] / 1.3 / 1.5)
    assert regression.main(["--check", "--baseline", str(baseline)]) == 1
    assert "timing regression" in capsys.readouterr().err
    write_baseline(baseline, run["ratio"] * 1.5)
    assert regression.main(["--check", "--baseline", str(baseline)]) == 0


def test_missing_baseline_is_an_error(tmp_path):
    assert regression.main(["--check", "--repeats", "1", "--baseline", str(tmp_path / "none.json")]) == 2
