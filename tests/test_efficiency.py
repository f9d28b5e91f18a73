"""Efficiency harness (evaluation.run_efficiency, resource_sampler, efficiency_report): no GPU, no docker.

The end-to-end runs use `--command` with a small Python job, and a fake `docker` executable on PATH for
the docker path (it logs its argv and plays the container).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from evaluation import efficiency_report as report
from evaluation.case_record import CaseRecord
from evaluation import resource_sampler as sampler
from evaluation import run_efficiency as harness

REPO = Path(__file__).resolve().parent.parent


ALLOCATED_MB = 64
SLEEP_S = 0.5
OFFICIAL_JSON_KEYS = {"gpu_memory", "cpu_list", "RAM_list", "time"}

# The job every case runs: allocate and touch ALLOCATED_MB, burn a little CPU, sleep, write the output.
# Case names steer it: "noout" writes nothing, "slow" hangs (with a child process) until killed.
JOB = textwrap.dedent(f"""
    import os, shutil, subprocess, sys, time
    inputs, outputs = os.environ["INPUT_DIR"], os.environ["OUTPUT_DIR"]
    names = os.listdir(inputs)
    assert len(names) == 1, names
    name = names[0]
    if "slow" in name:
        child = subprocess.Popen(["sleep", "120"])
        # and one that escapes: a new session, its parent gone at once (re-parented away from the job)
        escaped = subprocess.run(["sh", "-c", "setsid sleep 121 > /dev/null 2>&1 & echo $!"],
                                 capture_output=True, text=True).stdout.strip()
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}} {{escaped}}")
        time.sleep(120)
    block = b"x" * ({ALLOCATED_MB} << 20)
    start = time.process_time()
    while time.process_time() - start < 0.2:
        pass
    time.sleep({SLEEP_S})
    if "noout" not in name:
        shutil.copy(os.path.join(inputs, name), os.path.join(outputs, name.replace("_0000.nii.gz", ".nii.gz")))
""")

FAKE_DOCKER = textwrap.dedent("""
    import json, os, shutil, sys, time
    args = sys.argv[1:]
    with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[:2] == ["container", "run"]:
        mounts = dict(reversed(args[i + 1].rsplit(":", 1)) for i, a in enumerate(args) if a == "-v")
        inputs, outputs = mounts["/workspace/inputs/"], mounts["/workspace/outputs/"]
        name = os.listdir(inputs)[0]
        if "slow" in name:
            time.sleep(120)
        shutil.copy(os.path.join(inputs, name), os.path.join(outputs, name.replace("_0000.nii.gz", ".nii.gz")))
    elif args[:1] == ["inspect"]:
        sys.exit(1)
    elif args[:1] == ["version"]:
        print("0.0-fake")
""")


def nvml_available(index: int = 0) -> bool:
    try:
        sampler.open_gpu(index)
    except sampler.GpuUnavailable:
        return False
    sampler.close_gpu()
    return True


def make_cases(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}_0000.nii.gz").write_bytes(b"not really a nifti " + name.encode())
    return folder


def run_harness(args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluation.run_efficiency", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def job_command(tmp: Path) -> str:
    script = tmp / "job.py"
    script.write_text(JOB)
    return f"{sys.executable} {script}"


# ------------------------------------------------------------------------------------- arithmetic (units)

def test_auc_is_rounded_sum_times_interval():
    assert report.auc([1000, 2000, 3000.4]) == 600.0
    assert report.auc([1000, 2000, 3000.4], interval=0.5) == 3000.0
    assert report.auc([14.9], interval=0.1) == 1.0  # 1.49 -> 1
    assert report.auc([25], interval=0.1) == 2.0  # 2.5 -> 2: np.round, half to even, as the official script
    assert report.auc([10.0, None, 20.0]) == 3.0  # a failed reading is left out
    assert report.auc([]) != report.auc([])  # NaN: no GPU


def test_tolerance_figures():
    samples = [4000.0, 5000.0, 6096.0, 3000.0]
    assert report.over_limit_auc(samples, 4096) == 290.0  # (904 + 2000) * 0.1 = 290.4 -> 290
    assert report.over_limit_auc([100.0], 4096) == 0.0
    assert report.time_over_limit(50.126, 45) == 5.13
    assert report.time_over_limit(30.0, 45) == 0.0
    assert report.peak([1.0, 7.6, 3.0]) == 8.0
    assert report.official_cpu_used([[10, 5, 85], [50, 0, 50]]) == [15.0, 50.0]


def test_case_row_with_gpu_samples():
    record = CaseRecord.from_json({"name": "X_0000.nii.gz", "case": "X", "mode": "command", "time": 46.004, "gpu_memory": [500.0, 4596.0, 5096.0],
              "gpu_utilization": [0.0, 97.0, None, 100.0],  # a failed reading (None) is left out
              "cpu_list": [[10.0, 5.0, 85.0], [30.0, 10.0, 60.0]], "RAM_list": [1000.0, 1200.0],
              "tree_rss_mb": [10.0, 300.0], "tree_cpu_percent": [0.0, 150.0], "interval_s": 0.1,
              "status": "ok", "output_found": True, "timestamps": [1.0, 1.1, 1.2]})
    row = report.case_row(record)
    assert list(row) == report.COLUMNS
    assert row["Name"] == "X_0000.nii.gz"
    assert row["Time"] == 46.0 and row["time_over_limit"] == 1.0 and row["pass_time"] is False
    assert row["MaxGPU_Mem"] == 5096.0 and row["AUC_GPU_Time"] == 1019.0  # 10192 * 0.1 = 1019.2
    assert row["gpu_mem_over_auc"] == 150.0 and row["pass_gpu"] is False  # (500 + 1000) * 0.1
    assert row["gpu_mem_before_mb"] == 500.0
    assert row["MeanGPU_Util_Percent"] == 65.7  # (0 + 97 + 100) / 3
    assert row["MaxCPU_Utilization"] == 40.0 and row["AUC_CPU_Time"] == 5.5
    assert row["MaxRAM"] == 1200.0 and row["AUC_RAM_Time"] == 220.0
    assert row["MaxTreeRSS_MB"] == 300.0 and row["MaxTreeCPU_Percent"] == 150.0
    loose = report.case_row(record, time_limit_s=60, gpu_limit_mb=8192)
    assert loose["pass_time"] is True and loose["pass_gpu"] is True and loose["gpu_mem_over_auc"] == 0.0


def test_cpu_arithmetic():
    assert sampler.tree_cpu_percent({(1, 0.0): 2.0}, {(1, 0.0): 2.05, (2, 5.0): 0.03}, 0.1) == pytest.approx(80.0)
    assert sampler.tree_cpu_percent({}, {(1, 0.0): 1.0}, 0.0) == 0.0
    before = SimpleNamespace(user=10.0, system=5.0, idle=100.0)
    after = SimpleNamespace(user=10.3, system=5.1, idle=100.6)
    assert sampler.system_cpu_split(before, after) == pytest.approx([30.0, 10.0, 60.0])


# ------------------------------------------------------------------------------------------- NVML (units)

def test_read_gpu_used_mb_is_total_minus_free(monkeypatch):
    import pynvml
    memory = SimpleNamespace(total=80 * 1024 * sampler.MIB, free=76 * 1024 * sampler.MIB + sampler.MIB // 2,
                             used=123)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: memory)
    assert sampler.read_gpu_used_mb("handle") == pytest.approx(4 * 1024 - 0.5)


def test_open_gpu_reports_missing_nvml_in_one_line(monkeypatch):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    with pytest.raises(sampler.GpuUnavailable) as caught:
        sampler.open_gpu(0)
    assert "NVML unavailable" in str(caught.value) and "\n" not in str(caught.value)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    with pytest.raises(sampler.GpuUnavailable, match="no GPU 3"):
        sampler.open_gpu(3)


# ------------------------------------------------------------------------------------ docker argv (units)

def test_docker_argv_is_the_official_command(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    argv = harness.build_docker_argv("myteam", "flare-eff-case_01-abc", inputs, outputs, gpu=1)
    assert argv == ["docker", "container", "run", "--gpus", "device=1", "-m", "28G", "--shm-size=28gb",
                    "--name", "flare-eff-case_01-abc", "--rm",
                    "-v", f"{inputs.resolve()}/:/workspace/inputs/",
                    "-v", f"{outputs.resolve()}/:/workspace/outputs/",
                    "myteam:latest", "/bin/bash", "-c", "sh predict.sh"]
    assert harness.build_docker_argv("t:v2", "n", inputs, outputs, 0, memory="8G")[5:7] == ["-m", "8G"]
    assert harness.docker_image_ref("t:v2") == "t:v2"
    assert harness.docker_image_ref("registry:5000/team") == "registry:5000/team:latest"
    assert harness.docker_image_ref("team@sha256:ab") == "team@sha256:ab"
    with pytest.raises(harness.HarnessError):
        harness.build_docker_argv("t", "n", tmp_path / "a:b", outputs, 0)


def test_container_names_are_lower_case_and_unique():
    names = {harness.container_name("FLARE_Case 07") for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert name == name.lower() and name.startswith("flare-eff-flare_case-07-")
        assert all(c.isalnum() or c in "_.-" for c in name)


def test_find_cases_accepts_a_dataset_root(tmp_path):
    make_cases(tmp_path / "root" / "images", ["b", "a"])
    (tmp_path / "root" / "images" / "a_0001.nii.gz").write_bytes(b"other modality")
    assert [case for case, _ in harness.find_cases(tmp_path / "root")] == ["a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(harness.HarnessError, match="no \\*_0000.nii.gz"):
        harness.find_cases(tmp_path / "empty")


def test_process_tree_usage_sums_descendants():
    code = ("import subprocess, sys, time; b = b'x' * (48 << 20); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "print('up', flush=True); time.sleep(30)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline().strip() == b"up"
        usage = sampler.process_tree_usage(process.pid)
        assert usage.n_processes == 2 and usage.rss_mb >= 48
        assert all(seconds >= 0 for seconds in usage.cpu_seconds.values())
        assert sampler.process_tree_usage([process.pid, process.pid]).n_processes == 2
    finally:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        process.wait()
    assert sampler.process_tree(process.pid) == []


# --------------------------------------------------------------------------------------------- plots

def test_plots_with_and_without_gpu_samples(tmp_path):
    samples = [800.0 + 100 * i for i in range(50)]
    record = CaseRecord.from_json({
        "name": "G_0000.nii.gz", "case": "G", "mode": "command", "time": 5.0, "launch_time": 100.0,
        "interval_s": 0.1, "timestamps": [100.0 + 0.1 * i for i in range(50)], "gpu_memory": samples,
        "cpu_list": [[1.0, 1.0, 98.0]] * 50, "RAM_list": [1.0] * 50, "tree_cpu_percent": [50.0] * 50,
        "tree_rss_mb": [100.0] * 50, "status": "ok"})
    no_gpu = replace(record, name="N_0000.nii.gz", case="N", gpu_memory=[], status="timeout")
    report.plot_case(record, tmp_path / "g.png")
    report.plot_case(no_gpu, tmp_path / "n.png")
    report.plot_summary([report.case_row(record), report.case_row(no_gpu)], tmp_path / "s.png")
    report.plot_summary([report.case_row(no_gpu)], tmp_path / "s2.png")
    for name in ("g.png", "n.png", "s.png", "s2.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ end to end, --command

@pytest.fixture(scope="module")
def command_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("efficiency")
    cases = make_cases(tmp / "cases", ["case_a", "case_b"])
    out = tmp / "out"
    result = run_harness(["--cases", cases, "--command", job_command(tmp), "--out", out])
    return SimpleNamespace(result=result, out=out, tmp=tmp)


def test_command_run_succeeds_and_writes_everything(command_run):
    out, result = command_run.out, command_run.result
    assert result.returncode == 0, result.stderr
    for name in ("run_info.json", "efficiency.csv", "summary.png", "cases/case_a.json",
                 "cases/case_a.png", "cases/case_b.png", "cases/case_a.log",
                 "predictions/case_a.nii.gz", "predictions/case_b.nii.gz"):
        assert (out / name).is_file(), name
    assert (out / "predictions/case_a.nii.gz").read_bytes() == b"not really a nifti case_a"
    assert "case_a_0000.nii.gz" in result.stdout and "Name" in result.stdout  # the final table
    info = json.loads((out / "run_info.json").read_text())
    for key in ("gpu_name", "host", "started_at", "finished_at", "mode", "command", "timeout_s"):
        assert key in info
    assert info["n_cases"] == 2 and info["n_failed"] == 0 and info["mode"] == "command"


def test_command_run_measures_time_cpu_and_rss(command_run):
    rows = read_csv(command_run.out / "efficiency.csv")
    assert list(rows[0])[:8] == report.OFFICIAL_COLUMNS
    assert set(report.OUR_COLUMNS) <= set(rows[0])
    assert [row["Name"] for row in rows] == ["case_a_0000.nii.gz", "case_b_0000.nii.gz"]
    for row in rows:
        assert row["status"] == "ok" and row["output_found"] == "True" and row["error"] == ""
        assert float(row["Time"]) >= SLEEP_S
        assert float(row["MaxTreeRSS_MB"]) >= ALLOCATED_MB
        assert float(row["MaxTreeCPU_Percent"]) > 0
        assert float(row["MaxRAM"]) > 0 and row["pass_time"] == "True"
        assert int(row["n_samples"]) >= 5

    record = json.loads((command_run.out / "cases" / "case_a.json").read_text())
    assert OFFICIAL_JSON_KEYS <= set(record)
    assert record["time"] >= SLEEP_S and record["interval_s"] == 0.1
    n = len(record["timestamps"])
    assert n >= 5 and len(record["cpu_list"]) == len(record["RAM_list"]) == len(record["tree_rss_mb"]) == n
    assert all(len(sample) == 3 for sample in record["cpu_list"])  # official [user, system, idle]
    assert record["timestamps"][0] <= record["launch_time"] < record["end_time"]  # sampler started first
    assert record["end_time"] - record["launch_time"] == pytest.approx(record["time"])
    assert max(record["tree_rss_mb"]) >= ALLOCATED_MB and max(record["tree_processes"]) >= 1


def test_gpu_columns_follow_nvml_availability(command_run):
    rows = read_csv(command_run.out / "efficiency.csv")
    record = json.loads((command_run.out / "cases" / "case_a.json").read_text())
    info = json.loads((command_run.out / "run_info.json").read_text())
    if nvml_available(0):
        assert float(rows[0]["MaxGPU_Mem"]) > 0 and record["gpu_memory"] and info["gpu_name"]
        assert len(record["gpu_utilization"]) == len(record["gpu_memory"])
    else:
        for column in ("MaxGPU_Mem", "AUC_GPU_Time", "gpu_mem_over_auc", "pass_gpu", "gpu_mem_before_mb",
                       "MeanGPU_Util_Percent"):
            assert rows[0][column] == "", column
        assert record["gpu_memory"] == [] and record["gpu_utilization"] == []
        assert info["gpu_name"] is None and info["gpu_note"]
        assert command_run.result.stderr.count("GPU memory is not sampled") == 1  # said once


def test_failed_and_timed_out_cases(tmp_path):
    cases = make_cases(tmp_path / "cases", ["noout", "slow"])
    out, pid_file = tmp_path / "out", tmp_path / "pids"
    env = dict(os.environ, PID_FILE=str(pid_file))
    result = run_harness(["--cases", cases, "--command", job_command(tmp_path), "--out", out, "--timeout", 5,
                          "--no-gpu", "--no-plots"], env=env)
    assert result.returncode == 1
    rows = {row["Name"]: row for row in read_csv(out / "efficiency.csv")}
    assert rows["noout_0000.nii.gz"]["status"] == "no_output"
    assert rows["noout_0000.nii.gz"]["output_found"] == "False"
    # quick, but no mask: a failed case passes nothing
    assert float(rows["noout_0000.nii.gz"]["Time"]) < 45 and rows["noout_0000.nii.gz"]["pass_time"] == "False"
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["noout.json", "noout.log", "slow.json", "slow.log"]
    slow = rows["slow_0000.nii.gz"]
    assert slow["status"] == "timeout" and "killed after 5 s" in slow["error"]
    assert 5 <= float(slow["Time"]) < 60  # killed, not waited for (the job sleeps 120 s)
    assert slow["MaxGPU_Mem"] == ""  # --no-gpu
    for pid in map(int, pid_file.read_text().split()):  # the job, its child and the escaped one are gone
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "2 case(s) failed" in result.stderr
    assert json.loads((out / "run_info.json").read_text())["n_failed"] == 2


# ------------------------------------------------------------------------------- end to end, --docker

def test_docker_mode_with_a_fake_docker_client(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    fake.chmod(0o755)
    log = tmp_path / "docker.log"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DOCKER_LOG=str(log))
    cases = make_cases(tmp_path / "cases", ["Case1", "slow"])
    out = tmp_path / "out"
    result = run_harness(["--cases", cases, "--docker", "MyTeam", "--out", out, "--gpu", 2, "--timeout", 4,
                          "--no-gpu", "--no-plots"], env=env)
    assert result.returncode == 1, result.stderr
    rows = {row["Name"]: row for row in read_csv(out / "efficiency.csv")}
    assert rows["Case1_0000.nii.gz"]["status"] == "ok"
    assert rows["slow_0000.nii.gz"]["status"] == "timeout"

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    runs = [call for call in calls if call[:2] == ["container", "run"]]
    assert len(runs) == 2
    record = json.loads((out / "cases" / "Case1.json").read_text())
    name = record["container_name"]
    assert name == name.lower() and "case1" in name
    assert runs[0] == record["argv"][1:] == harness.build_docker_argv(
        "MyTeam", name, Path(runs[0][11].split(":")[0]), Path(runs[0][13].split(":")[0]), 2)[1:]
    assert runs[0][14:] == ["MyTeam:latest", "/bin/bash", "-c", "sh predict.sh"]
    slow_name = json.loads((out / "cases" / "slow.json").read_text())["container_name"]
    assert ["kill", slow_name] in calls  # the container is killed, not only the client
    assert json.loads((out / "run_info.json").read_text())["image"] == "MyTeam:latest"


def test_timeline_of_the_real_engine_is_recorded_and_drawn(tmp_path):
    """--timeline: the engine's own timestamps (process start, imports, model, stages) land in the record in
    the order they happened, inside the run as the harness timed it, with the case's stage seconds."""
    import SimpleITK as sitk

    from conftest import make_ct_image, make_toy_model
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(make_ct_image(shape_zyx=(16, 32, 32)), str(cases / "ct_0000.nii.gz"))
    env = dict(os.environ, MODEL_DIR=str(make_toy_model(tmp_path / "model")), DEVICE="cpu", BACKEND="torch")
    out = tmp_path / "out"
    result = run_harness(["--cases", cases, "--command", "sh predict.sh", "--out", out, "--no-gpu", "--timeline"],
                         env=env)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "cases" / "ct.json").read_text())
    timeline = record["timeline"]
    order = ["process_start", "imports_done", "model_loaded", "read_start", "read", "crop_start", "crop",
             "resample_start", "resample", "network_start", "network", "export_start", "export", "write_start",
             "write", "ended"]
    assert list(timeline) == order
    assert all(timeline[a] <= timeline[b] + 0.02 for a, b in zip(order, order[1:]))  # 10 ms ticks
    assert -0.02 <= timeline["process_start"] and timeline["ended"] == pytest.approx(record["time"], abs=1e-3)
    assert record["engine_case"]["network"] > 0 and record["engine_case"]["model_load_s"] > 0
    assert (out / "cases" / "ct.png").stat().st_size > 10_000
    assert not list((out / "predictions").glob(".*"))


def test_a_gpu_without_utilisation_readings_keeps_its_memory_sampled(monkeypatch):
    """NVML answers memory but not utilisation on MIG instances and some vGPUs: memory must go on."""
    def no_utilisation(handle):
        raise RuntimeError("Not Supported")

    monkeypatch.setattr(sampler, "read_gpu_used_mb", lambda handle: 1234.0)
    monkeypatch.setattr(sampler, "read_gpu_busy_percent", no_utilisation)
    probe, series = sampler.ResourceProbe(gpu_handle=object()), sampler.SampleSeries()
    for _ in range(3):
        probe.sample(series)
    assert series.gpu_memory == [1234.0] * 3 and series.gpu_utilization == [None] * 3
    assert probe.gpu_error is None and "Not Supported" in probe.utilization_error
    monkeypatch.setattr(sampler, "read_gpu_busy_percent", lambda handle: 87.0)
    busy = sampler.ResourceProbe(gpu_handle=object())
    busy.sample(series)
    assert series.gpu_utilization[-1] == 87.0 and series.gpu_memory[-1] == 1234.0


def test_a_failed_run_is_summed_up_by_its_cause_not_by_a_usage_hint(tmp_path):
    from evaluation.run_efficiency import failure_cause
    log = tmp_path / "case.log"
    log.write_text("docker: Error response from daemon: pull access denied for flare-lesion.\n"
                   "See 'docker run --help'.\n")
    assert failure_cause(log) == "docker: Error response from daemon: pull access denied for flare-lesion."
    log.write_text("model models/default (folds all, onnx on cpu) loaded in 0.04 s; 1 case(s)\n"
                   "error: inputs/ct_0000.nii.gz: truncated or corrupt NIfTI file\n"
                   "error: 1 of 1 case(s) failed\n")
    assert failure_cause(log) == "error: inputs/ct_0000.nii.gz: truncated or corrupt NIfTI file"
    log.write_text("Killed\n")
    assert failure_cause(log) == "Killed"
