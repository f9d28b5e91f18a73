"""Many cases: the pipelined loop (inference/batch.py) and Ray workers (inference/scale_out.py).

The Ray tests start a local Ray with two one-core workers, as a laptop or a CI machine would; one of them
kills a worker in the middle of a case, as a lost node would.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from conftest import make_ct_image, make_toy_model
from inference import PredictionSettings, load_model
from inference.batch import predict_cases

REPO = Path(__file__).resolve().parent.parent
CASES = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six small CT-like cases, the third a broken file, and a toy model."""
    root = tmp_path_factory.mktemp("batch")
    images = root / "images"
    images.mkdir()
    for index in range(CASES):
        path = images / f"case{index}_0000.nii.gz"
        if index == 2:
            path.write_bytes(b"not an image")
        else:
            sitk.WriteImage(make_ct_image(shape_zyx=(20, 48, 48), seed=index), str(path))
    return root, images, make_toy_model(root / "model")


def run_batch(images: Path, out: Path, model, pipelined: bool, settings: PredictionSettings | None = None) -> list:
    cases = sorted(images.iterdir())
    out.mkdir()
    outputs = {path: out / path.name.replace("_0000", "") for path in cases}
    return list(predict_cases(cases, outputs, model, settings or PredictionSettings(), pipelined=pipelined))


def masks(folder_path: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder_path.glob("*.nii.gz"))}


def test_pipelined_and_sequential_write_the_same_masks_in_order_each_failure_its_own(folder, tmp_path):
    root, images, model_dir = folder
    model = load_model(model_dir, device="cpu")
    pipelined = run_batch(images, tmp_path / "pipelined", model, pipelined=True)
    sequential = run_batch(images, tmp_path / "sequential", model, pipelined=False)
    assert [r.path.name for r in pipelined] == sorted(p.name for p in images.iterdir())  # in order
    for results in (pipelined, sequential):
        assert [r.error is None for r in results] == [i != 2 for i in range(CASES)]
        assert "case2_0000.nii.gz: cannot read image" in results[2].error
        assert all(r.report.seconds["total"] >= r.report.seconds["write"] > 0 for r in results if r.report)
    ours, theirs = masks(tmp_path / "pipelined"), masks(tmp_path / "sequential")
    assert list(ours) == [f"case{i}.nii.gz" for i in range(CASES) if i != 2]
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    assert not [p for p in (tmp_path / "pipelined").iterdir() if p.name.startswith(".")]


def run_cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inference", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def worker_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any("CaseWorker" in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            pass
    return found


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install '.[ray]')")
def test_ray_workers_survive_a_killed_worker_and_a_rerun_resumes(folder, tmp_path):
    root, images, model_dir = folder
    reference = tmp_path / "reference"
    # small windows at a fine step: hundreds of windows a case, long enough to be killed in the middle of
    fine = PredictionSettings(patch_size=(16, 16, 16), step_size=0.1)
    run_batch(images, reference, load_model(model_dir, device="cpu"), pipelined=False, settings=fine)
    out, journal = tmp_path / "out", tmp_path / "run.journal.jsonl"
    args = ["-i", images, "-o", out, "-m", model_dir, "--device", "cpu", "--backend", "torch", "--ray",
            "--journal", journal, "--patch-size", "16", "16", "16", "--step-size", "0.1"]
    process = run_cli(*args, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    killed = None
    deadline = time.time() + 240
    while killed is None and process.poll() is None and time.time() < deadline:
        busy = [p for p in worker_processes() if "predict" in " ".join(p.cmdline())]
        if busy:
            killed = busy[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    stdout, stderr = process.communicate(timeout=600)
    assert killed is not None, f"no worker was seen at work; the run said:\n{stderr[-3000:]}"
    assert process.returncode == 1, stderr  # the broken case fails, alone
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error")] == [
        f"error: {images / 'case2_0000.nii.gz'}: cannot read image (not a readable image: unknown format, "
        "truncated or corrupt)", "error: 1 of 6 case(s) failed"]
    ours, theirs = masks(out), masks(reference)
    assert list(ours) == list(theirs) and all(np.array_equal(ours[name], theirs[name]) for name in ours)
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs)  # exactly the masks, no partial file
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(e["input"] for e in entries) == sorted(str(p) for p in images.iterdir())  # each case once
    assert not journal.is_relative_to(out)
    rerun = run_cli(*args)
    _, stderr = rerun.communicate(timeout=300)
    assert "5 of 6 case(s) already done, 1 to go" in stderr  # only the broken case is tried again


@pytest.mark.parametrize("where", ["this process", "ray"])
def test_on_error_empty_and_skip_existing_hold_wherever_the_cases_run(folder, tmp_path, where):
    """--on-error empty writes the failed case's empty mask; --skip-existing keeps only a mask this model and these
    settings made from this input that passes a fresh write's checks: a mask of unknown origin, a 0-byte file and
    the empty mask of a failed case are computed again."""
    if where == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install '.[ray]')")
    root, _, model_dir = folder
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    out.mkdir()
    for name, seed in (("good", 1), ("kept", 2), ("foreign", 3)):
        sitk.WriteImage(make_ct_image(shape_zyx=(20, 48, 48), seed=seed), str(images / f"{name}_0000.nii.gz"))
    # 60 mm voxels: refused (8000x up-sampling to the model's 3 mm) after a readable header
    coarse = make_ct_image(shape_zyx=(4, 8, 8), spacing_xyz=(60.0, 60.0, 60.0))
    sitk.WriteImage(coarse, str(images / "coarse_0000.nii.gz"))
    args = ["-i", images, "-o", out, "-m", model_dir, "--device", "cpu", "--on-error", "empty", "--skip-existing"]
    if where == "ray":
        args += ["--ray", "--ray-workers", "1", "--journal", tmp_path / "run.journal.jsonl"]
    _, stderr = (process := run_cli(*args)).communicate(timeout=300)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert [line.split(": ")[0] for line in stderr.splitlines() if line.startswith(("error", "warning"))] == [
        "error", "warning", "error"]  # the coarse case fails, gets its empty mask, and the run says 1 failed
    assert "wrote an empty mask coarse.nii.gz (--on-error empty)" in stderr
    assert "error: 1 of 4 case(s) failed" in stderr
    first = masks(out)
    assert sorted(first) == ["coarse.nii.gz", "foreign.nii.gz", "good.nii.gz", "kept.nii.gz"]
    assert first["coarse.nii.gz"].shape == (4, 8, 8) and first["coarse.nii.gz"].max() == 0
    assert first["good.nii.gz"].shape == (20, 48, 48)

    kept_stamp = (out / "kept.nii.gz").stat().st_mtime_ns
    (out / "good.nii.gz").write_bytes(b"")  # a 0-byte file: not a mask
    foreign = sitk.Cast(sitk.ReadImage(str(images / "foreign_0000.nii.gz")) * 0 + 1, sitk.sitkUInt8)
    sitk.WriteImage(foreign, str(out / "foreign.nii.gz"))  # a mask no engine would predict, of no known origin
    _, stderr = (process := run_cli(*args)).communicate(timeout=300)
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert "good.nii.gz: computed again (--skip-existing): the mask there is an empty file" in stderr
    assert "foreign.nii.gz: computed again (--skip-existing): the mask there is no record of what made it" in stderr
    assert "coarse.nii.gz: computed again (--skip-existing): the mask there is the empty mask of a failed" in stderr
    again = masks(out)
    assert (out / "kept.nii.gz").stat().st_mtime_ns == kept_stamp  # kept, not computed again
    assert all(np.array_equal(again[name], first[name]) for name in first)  # the same masks as the first run


def test_the_journal_counts_a_case_done_only_for_the_same_run_input_and_mask(folder, tmp_path):
    """scale_out.still_done, without Ray: what a resumed --ray run skips."""
    from inference import io, provenance
    from inference.scale_out import Journal, journal_entry, still_done
    from inference.batch import CaseResult
    from inference.timing import CaseReport
    _, images, model_dir = folder
    source = images / "case0_0000.nii.gz"
    model = load_model(model_dir, device="cpu")
    run = provenance.run_fingerprint(model.fingerprint(), PredictionSettings(), "auto", "cpu")
    out = tmp_path / "out"
    out.mkdir()
    [result] = predict_cases([source], {source: out / "case0.nii.gz"}, model, PredictionSettings(), run=run)
    journal = Journal(tmp_path / "run.journal.jsonl")
    journal.record(journal_entry(result, run))
    journal.record({"input": str(images / "case1_0000.nii.gz"), "status": "failed"})
    (tmp_path / "run.journal.jsonl").open("a").write('{"input": "cut short')  # a driver killed mid-line
    entry = journal.finished()[str(source)]
    assert list(journal.finished()) == [str(source)]
    assert still_done(source, out / "case0.nii.gz", entry, run) is None
    other = provenance.run_fingerprint(model.fingerprint(), PredictionSettings(step_size=0.7), "auto", "cpu")
    assert still_done(source, out / "case0.nii.gz", entry, other) == (
        "done by another model, other settings or from another input")
    assert still_done(source, out / "case0.nii.gz", None, run) == "not done"
    (out / "case0.nii.gz").unlink()
    assert still_done(source, out / "case0.nii.gz", entry, run) == "no mask"


def test_a_worker_that_loads_another_model_than_the_driver_runs_no_case(folder, tmp_path):
    """A node that sees other files at the model folder's path: every case it is handed fails with one line."""
    from inference.scale_out import CaseWorker
    from inference.settings import RunOptions
    _, images, model_dir = folder
    worker = CaseWorker(RunOptions(images, tmp_path, model_dir, device="cpu", backend="torch"), PredictionSettings(),
                        run="0123456789abcdef")
    source = images / "case0_0000.nii.gz"
    [result] = worker.predict([(str(source), str(tmp_path / "case0.nii.gz"))])
    assert "not run: the model folder seen by the worker on" in result.error and str(model_dir) in result.error
    assert not (tmp_path / "case0.nii.gz").exists()


def test_a_case_whose_result_never_comes_back_fails_the_run(tmp_path, caplog):
    """However the cases run, a case of the batch that no result names is a failed case with its line, and
    an earlier run's mask at its path is removed: never a run that ends well without it."""
    import logging
    from inference import cli
    from inference.batch import CaseResult
    args = cli.build_parser().parse_args(["-i", str(tmp_path), "-o", str(tmp_path / "out")])
    paths = [tmp_path / "a_0000.nii.gz", tmp_path / "b_0000.nii.gz"]
    outputs = {path: tmp_path / "out" / path.name.replace("_0000", "") for path in paths}
    (tmp_path / "out").mkdir()
    outputs[paths[1]].write_bytes(b"an earlier run's mask")
    report, done = {"cases": {}}, []
    with caplog.at_level(logging.INFO, logger="inference"):
        failures = cli.record_results(iter([CaseResult(paths[0], outputs[paths[0]], kept=True)]), paths, outputs,
                                      cli.run_options_from_args(args), report, done, show_bar=False)
    assert failures == 1 and done == ["a_0000.nii.gz"] and not outputs[paths[1]].exists()
    assert f"error: {paths[1]}: no result came back for it (a fault of the engine) (removed b.nii.gz" in caplog.text
    assert report["cases"] == {
        "a_0000.nii.gz": {"status": "kept", "input": str(paths[0]), "output": str(outputs[paths[0]])},
        "b_0000.nii.gz": {"status": "failed", "error": f"{paths[1]}: no result came back for it (a fault of the "
                                                       "engine)", "input": str(paths[1]), "output": None}}


class FakeRay:
    """Just what scale_out.task_results asks of Ray: futures that are finished when made, in order."""

    @staticmethod
    def wait(futures, num_returns=1, timeout=None):
        return [futures[0]], futures[1:]

    @staticmethod
    def get(future):
        if isinstance(future.outcome, BaseException):
            raise future.outcome
        return future.outcome


class FakeFuture:
    def __init__(self, outcome):
        self.outcome = outcome


class FakeWorker:
    """A worker whose calls give `script`'s outcomes in turn (then plain results), and which answers whether it is
    back with `back` (False: lost for good)."""

    def __init__(self, name, script=(), back=True):
        self.name, self.script, self.back = name, list(script), back
        self.predict = type("method", (), {"remote": self.run})()
        self.__ray_ready__ = type("method", (), {"remote": self.ready})()

    def run(self, task):
        from inference.batch import CaseResult
        outcome = self.script.pop(0) if self.script else None
        return FakeFuture(outcome or [CaseResult(Path(case), Path(out), worker=self.name) for case, out in task])

    def ready(self):
        from ray.exceptions import ActorUnavailableError
        return FakeFuture(True if self.back else ActorUnavailableError("still gone", b"\0" * 16))


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install '.[ray]')")
def test_task_results_hand_a_lost_workers_cases_on_and_never_lose_one(monkeypatch):
    from ray.exceptions import ActorUnavailableError
    from inference import scale_out
    monkeypatch.setattr(scale_out, "WORKER_BACK_S", 0.2)
    monkeypatch.setattr(scale_out, "PROBE_EVERY_S", 0.01)
    tasks = [[(f"case{i}", f"out{i}")] for i in range(6)]
    unreachable = ActorUnavailableError("node died", b"\0" * 16)
    pair = [[("case0", "out0"), ("case1", "out1")]]  # a task of two cases whose worker is lost
    results = [r for batch in scale_out.task_results(FakeRay, [FakeWorker("w", [unreachable])], pair) for r in batch]
    assert sorted(r.path.name for r in results) == ["case0", "case1"] and not any(r.error for r in results)
    # a worker lost once (back at once), one lost for good, one whose code raises on one task
    workers = [FakeWorker("flaky", [unreachable]), FakeWorker("gone", [unreachable], back=False),
               FakeWorker("buggy", [ValueError("a bug")])]
    results = [r for batch in scale_out.task_results(FakeRay, workers, tasks) for r in batch]
    assert sorted(r.path.name for r in results) == [f"case{i}" for i in range(6)]  # every case, once
    failed = [r for r in results if r.error]
    assert len(failed) == 1 and failed[0].error.endswith(": a bug")  # only the bug's case fails
    assert {r.worker for r in results if not r.error} <= {"flaky", "buggy"}  # never the worker lost for good
    # every worker lost for good: the cases fail with their line, none goes missing
    gone = [FakeWorker(name, [unreachable] * 9, back=False) for name in ("a", "b")]
    results = [r for batch in scale_out.task_results(FakeRay, gone, tasks) for r in batch]
    assert sorted(r.path.name for r in results) == [f"case{i}" for i in range(6)]
    assert all(r.error and ("its worker was lost" in r.error or "every Ray worker was lost" in r.error)
               for r in results)


def test_a_stop_while_the_pools_are_waited_for_is_returned_after_they_are_done():
    """SIGTERM (a KeyboardInterrupt here) inside a pool's shutdown: the shutdown is waited for again, and the stop is
    handed back for the caller to raise, never swallowed (the process would run on after `docker stop`)."""
    from inference.batch import wait_for_pools

    class InterruptedOnce:
        def __init__(self):
            self.calls = 0

        def shutdown(self, wait, cancel_futures):
            self.calls += 1
            if self.calls == 1:
                raise KeyboardInterrupt("SIGTERM")

    pools = [InterruptedOnce(), InterruptedOnce()]
    stop = wait_for_pools(pools)
    assert isinstance(stop, KeyboardInterrupt) and [pool.calls for pool in pools] == [2, 2]

    class Quiet:
        def shutdown(self, wait, cancel_futures):
            pass

    assert wait_for_pools([Quiet()]) is None


def test_a_ray_driver_reads_the_calibration_record_of_its_workers_device_kind(tmp_path, monkeypatch):
    """--ray --device auto: the driver (here a CPU) reads the record of the device its workers compute on: the
    cluster's GPUs where it has any (each worker is given one), else the CPUs."""
    import ray

    import inference.scale_out as scale_out
    from inference.model.calibration import CALIBRATION_FILE

    assert scale_out.cluster_device_kind(None) == "cpu"  # a real local Ray: no GPU here
    ray.shutdown()

    class GpuCluster:
        @staticmethod
        def cluster_resources():
            return {"CPU": 32.0, "GPU": 2.0}

    monkeypatch.setattr(scale_out, "start_ray", lambda address: GpuCluster)
    assert scale_out.cluster_device_kind("head:6379") == "cuda"
    monkeypatch.undo()

    model_dir = make_toy_model(tmp_path / "model")
    fingerprint = load_model(model_dir, device="cpu").fingerprint()
    chosen = {"step_size": 0.5, "backend": "torch", "crop": "exact"}
    (model_dir / CALIBRATION_FILE).write_text(json.dumps({"records": {
        "cpu": {"chosen": {**chosen, "patch_scale": 1.2}, "model_fingerprint": fingerprint},
        "cuda": {"chosen": {**chosen, "patch_scale": 1.5, "precision": "fp32"}, "model_fingerprint": fingerprint}}}))
    images = tmp_path / "images"
    images.mkdir()
    sitk.WriteImage(make_ct_image(shape_zyx=(40, 96, 96)), str(images / "case_0000.nii.gz"))
    # a cluster of GPUs as the driver would see it; the workers (this machine's CPUs) run what it decides
    monkeypatch.setattr(scale_out, "cluster_device_kind", lambda address: "cuda")
    from inference.cli import main
    report = tmp_path / "report.json"
    assert main(["-i", str(images), "-o", str(tmp_path / "out"), "-m", str(model_dir), "--ray", "--quiet",
                 "--report", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["precision"] == "fp32" and written["settings"]["patch_scale"] == 1.5
    assert written["cases"]["case_0000.nii.gz"]["patch_size"] == [48, 48, 48]  # the cuda record's x1.5
