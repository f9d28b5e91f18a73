"""training/gpu_train.sh, the GPU training path, run on the CPU with a handful of steps: a model folder with
the larger network's shape, both models scored on the same validation phantoms, the comparison written."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_training_script_trains_scores_and_compares_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", MINUTES="10", STEPS="3", CASES="3", WORKERS="2",
               PATCH="32 32 32", FEATURES="4", BATCH="2", EVAL_CASES="1", EVAL_HEALTHY="1",
               EVAL_SHAPE="48 96 96", OUT=str(out), WORK=str(tmp_path / "work"))
    done = subprocess.run(["bash", "training/gpu_train.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png", "log.txt",
                                                     "model.tar.gz", "scores.tar.gz"]
    with tarfile.open(out / "model.tar.gz") as archive:
        names = archive.getnames()
        plans = json.load(archive.extractfile("model_gpu/plans.json"))
        log = json.load(archive.extractfile("model_gpu/training_log.json"))
    assert "model_gpu/fold_all/checkpoint_final.pth" in names
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["patch_size"] == [32, 32, 32]
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"][:2] == [4, 8]
    assert log["steps"] == 3 and log["workers"] == 2 and log["device"] == "cpu" and log["batch_size"] == 2
    with tarfile.open(out / "scores.tar.gz") as archive:
        scores = {name: json.load(archive.extractfile(f"scores/{name}.json")) for name in ("gpu", "default")}
    assert {s["eval_seed"] for s in scores.values()} == {8}
    assert all(s["metrics"]["lesion_cases"] == 1 and s["metrics"]["healthy_cases"] == 1 for s in scores.values())
    compared = json.loads((out / "compare.json").read_text())["runs"]
    assert [run["steps"] for run in compared] == [json.loads((REPO / "models/default/training_log.json")
                                                             .read_text())["steps"], 3]
    assert compared[1]["label"] == "cpu, 3 steps" and compared[1]["loss_curve"][-1][0] == 3
    assert "trained:" in (out / "log.txt").read_text() and "scored:" in (out / "log.txt").read_text()
