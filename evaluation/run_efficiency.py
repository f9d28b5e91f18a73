"""Efficiency harness: run a FLARE container (or a local command) once per case and measure it.

    python -m evaluation.run_efficiency --cases DIR (--docker IMAGE | --command CMD) --out OUT
                                        [--gpu N] [--timeout S] [--time-limit 45] [--gpu-limit-mb 4096]
                                        [--engine docker|podman] [--timeline]

For every `<case>_0000.nii.gz` in DIR (or DIR/images/): a fresh inputs folder holding only that file, a
fresh outputs folder, a sampler process (evaluation.resource_sampler: whole-GPU used memory via NVML,
CPU and RAM every 0.1 s) started before the run and stopped after it, and the wall time of the run from
right before launching it to right after it returns (container start-up included, as the official
script). The run is either the official docker command or, for development, a shell command with
INPUT_DIR / OUTPUT_DIR set to the fresh folders. A run without `<case>.nii.gz` in its outputs, with a
non-zero exit code, or past --timeout (killed) is a failed case; the exit code is 1 when any case failed.

`--engine podman` runs the same official arguments with podman instead of the docker client. `--timeline`
also asks the engine for its start-up and stage timestamps (TIMINGS_JSON, written to a folder of the
case's own, the only addition to the command) and draws them on the per-case figure, from launch to the
container's end.

OUT gets: run_info.json (GPU name, host, date, settings), efficiency.csv (official columns + ours),
summary.png, cases/<case>.json (raw samples; official keys + ours), cases/<case>.png,
cases/<case>.log (the run's stdout/stderr) and predictions/<case>.nii.gz. See docs/efficiency.md.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from flare_common.arguments import OneLineParser, program_name
from flare_common.machine import machine_facts
from inference import CaseError, io
from evaluation.case_record import SERIES, CaseRecord
from evaluation.efficiency_report import case_file
from evaluation.resource_sampler import (REPO_ROOT, GpuUnavailable, SamplerError, SamplerProcess, close_gpu,
                                         open_gpu)

CASE_SUFFIX = "_0000.nii.gz"
CONTAINER_INPUTS = "/workspace/inputs/"
CONTAINER_OUTPUTS = "/workspace/outputs/"
CONTAINER_TIMINGS = "/workspace/timings/"
TIMINGS_NAME = "timings.json"
FAILED_EXIT = 1
USAGE_EXIT = 2


class HarnessError(Exception):
    """Bad input to the harness itself (one-line message)."""


# ------------------------------------------------------------------------------------------------- cases

def find_cases(cases_dir: Path) -> list[tuple[str, Path]]:
    """(case name, image path) of every `<case>_0000.nii.gz` (the one file the organisers put in inputs/) among
    the cases the engine finds (inference.io.find_cases) in `cases_dir`, else in `cases_dir/images`."""
    cases_dir = Path(cases_dir)
    if not cases_dir.is_dir():
        raise HarnessError(f"{cases_dir}: not a folder")
    for folder in (cases_dir, cases_dir / "images"):
        if folder.is_dir():
            try:
                images = [p for p in io.find_cases(folder).cases if p.name.endswith(CASE_SUFFIX)]
            except CaseError:  # no case at all in this folder
                continue
            if images:
                return [(io.case_id(p), p) for p in images]
    raise HarnessError(f"{cases_dir}: no *{CASE_SUFFIX} file in it or in its images/ folder")


def prepare_case_folders(work_root: Path, case: str, image: Path) -> tuple[Path, Path, Path]:
    """A fresh (case folder, inputs, outputs); inputs holds only the case's image (hard link, else copy)."""
    work_root.mkdir(parents=True, exist_ok=True)
    case_dir = Path(tempfile.mkdtemp(prefix=f"{case}-", dir=work_root))
    inputs, outputs = case_dir / "inputs", case_dir / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    # A container may run as another user than us: let it write its prediction (the official script
    # makes outputs/ world-writable too).
    outputs.chmod(0o777)
    target = inputs / image.name
    try:
        os.link(image, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(image, target)
    return case_dir, inputs, outputs


# ------------------------------------------------------------------------------------------------ docker

def docker_image_ref(image: str) -> str:
    """The image reference to run: `IMAGE:latest` unless a tag (or digest) is given."""
    last = image.rsplit("/", 1)[-1]
    return image if (":" in last or "@" in last) else f"{image}:latest"


def container_name(case: str, prefix: str = "flare-eff") -> str:
    """A lower-case docker container name, unique per case and run."""
    cleaned = re.sub(r"[^a-z0-9_.-]+", "-", case.lower()).strip("-_.") or "case"
    return f"{prefix}-{cleaned}-{uuid.uuid4().hex[:8]}"


def build_docker_argv(image: str, name: str, inputs: Path, outputs: Path, gpu: int, memory: str = "28G",
                      shm_size: str = "28gb", docker: str = "docker", timings: Path | None = None) -> list[str]:
    """The official FLARE command as an argv list (no shell):

    docker container run --gpus "device=N" -m 28G --shm-size=28gb --name NAME --rm
        -v IN:/workspace/inputs/ -v OUT:/workspace/outputs/ IMAGE:latest /bin/bash -c "sh predict.sh"

    `timings` (a host folder) adds `-e TIMINGS_JSON=... -v TIMINGS:/workspace/timings/`: the engine's
    timestamps land there, never in the outputs folder.
    """
    folders = (inputs, outputs) + ((timings,) if timings is not None else ())
    for folder in folders:
        if ":" in str(folder):
            raise HarnessError(f"{folder}: a path with ':' cannot be mounted with docker -v")
    extra = [] if timings is None else ["-e", f"TIMINGS_JSON={CONTAINER_TIMINGS}{TIMINGS_NAME}",
                                        "-v", f"{Path(timings).resolve()}/:{CONTAINER_TIMINGS}"]
    return [docker, "container", "run", "--gpus", f"device={gpu}", "-m", memory, f"--shm-size={shm_size}",
            "--name", name, "--rm",
            "-v", f"{Path(inputs).resolve()}/:{CONTAINER_INPUTS}",
            "-v", f"{Path(outputs).resolve()}/:{CONTAINER_OUTPUTS}", *extra,
            docker_image_ref(image), "/bin/bash", "-c", "sh predict.sh"]


def container_host_pid(name: str, docker: str = "docker") -> int | None:
    """Host pid of the container's first process (docker inspect), None while it does not run."""
    try:
        result = subprocess.run([docker, "inspect", "--format", "{{.State.Pid}}", name], capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = result.stdout.strip()
    return int(text) if result.returncode == 0 and text.isdigit() and int(text) > 0 else None


def docker_kill(name: str, docker: str = "docker") -> None:
    """`docker kill NAME` (best effort: the container may already be gone)."""
    try:
        subprocess.run([docker, "kill", name], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _follow_container(name: str, docker: str, process: subprocess.Popen, sampler: SamplerProcess,
                      lock: threading.Lock, found: dict) -> None:
    """Until the run ends: find the container's host pid and add its process tree to the sampler.

    Its processes are not children of the docker client, so without this only the client is seen. Where
    the container lives in another pid namespace or a VM (rootless docker, Docker Desktop) nothing is found.
    """
    while process.poll() is None:
        pid = container_host_pid(name, docker)
        if pid is not None and psutil.pid_exists(pid):
            with lock:
                if process.poll() is None:
                    sampler.follow(pid)
                    found["container_pid"] = pid
            return
        time.sleep(0.2)


# -------------------------------------------------------------------------------------------------- runs

@dataclass
class Settings:
    mode: str                      # "docker" or "command"
    target: str                    # the image or the shell command
    gpu: int
    sample_gpu: bool
    timeout_s: float
    interval_s: float
    workdir: Path
    memory: str = "28G"
    shm_size: str = "28gb"
    docker: str = "docker"
    timeline: bool = False


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> bool:
    """Make this process the one that orphans of its runs are re-parented to, instead of init: a process a
    run left behind (a daemon, a double fork into a new session) stays our descendant, and `kill_leftovers`
    finds it. Linux only; False where it is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def kill_leftovers(keep: set[int]) -> list[int]:
    """SIGKILL every descendant of this process but those in `keep` (the sampler), and reap them; returns
    their pids. With become_subreaper, that includes whatever a run left behind, in any session."""
    killed = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in keep:
            continue
        try:
            if any(parent.pid in keep for parent in child.parents()):
                continue
            child.kill()
            killed.append(child.pid)
        except psutil.Error:
            pass
    psutil.wait_procs([psutil.Process(pid) for pid in killed if psutil.pid_exists(pid)], timeout=10)
    return killed


def kill_run(process: subprocess.Popen, container: str | None, docker: str) -> None:
    """Kill a run: the container (docker kill), then the launched process group and any descendant."""
    if container:
        docker_kill(container, docker)
    descendants = []
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the run was started in its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    for child in descendants:  # a descendant that started its own process group
        try:
            child.kill()
        except psutil.Error:
            pass
    process.wait()


def failure_cause(log_path: Path) -> str:
    """The line of a failed run's log that says why: the engine's last one-line `error: ...` (not its summary
    "N of M case(s) failed"), else a client's or Python's error line (docker's `Error response from daemon: ...`,
    `SomethingError: ...`), else the last line; never a usage hint after the cause, such as docker's
    "See 'docker run --help'."."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    engine = [line for line in lines if line.startswith("error: ") and not line.startswith("error: stopped by")
              and not re.match(r"error: \d+ of \d+ case\(s\) failed", line)]
    client = [line for line in lines if re.search(r"Error response from daemon|\b\w*Error: ", line)]
    cause = engine or client or lines
    return cause[-1][:200] if cause else ""


def engine_report(timings_path: Path) -> dict | None:
    """The engine's --timings JSON of a one-case run, None when it wrote no usable one (it failed, or it is
    not our engine)."""
    try:
        report = json.loads(timings_path.read_text())
        if not isinstance(report["startup"], dict) or "at" not in next(iter(report["cases"].values())):
            return None
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None
    return report


def engine_timeline(report: dict | None, launch: float, end: float) -> dict | None:
    """The engine's timestamps (engine_report) as seconds since launch, in the order they happen:
    process_start, imports_done, model_loaded, then each stage's start (`<stage>_start`) and end, and
    `ended` (the run's end as the harness saw it: process exit and, for a container, its removal)."""
    if report is None:
        return None
    startup, stages = report["startup"], next(iter(report["cases"].values()))["at"]
    points = {name: startup.get(name) for name in ("process_start", "imports_done", "model_loaded")}
    for stage, (begin, finish) in stages.items():
        points[f"{stage}_start"], points[stage] = begin, finish
    points["ended"] = end
    return {name: round(at - launch, 3) for name, at in sorted(points.items(), key=lambda item: item[1] or 0)
            if isinstance(at, (int, float))}


@dataclass
class PreparedRun:
    """A case's run, ready to start: its folders, what to start and with which environment."""

    case_dir: Path
    inputs: Path
    outputs: Path
    log_path: Path
    popen_args: dict
    env: dict
    timings_dir: Path | None = None
    container: str | None = None


@dataclass
class Outcome:
    """How a run ended, as the harness saw it, and the sampler's samples."""

    start: float
    end: float
    returncode: int | None = None
    timed_out: bool = False
    launch_error: str | None = None
    container_pid: int | None = None
    leftovers: int = 0
    samples: dict = field(default_factory=dict)


def prepare_run(record: CaseRecord, image: Path, settings: Settings, out_dir: Path) -> PreparedRun:
    """Fresh folders for the case, and the command that runs it: the official docker arguments, or the shell
    command with INPUT_DIR / OUTPUT_DIR (and TIMINGS_JSON with --timeline) set. Notes the command in `record`."""
    case_dir, inputs, outputs = prepare_case_folders(out_dir / "work", record.case, image)
    timings_dir = case_dir / "timings" if settings.timeline else None
    if timings_dir is not None:
        timings_dir.mkdir()
        timings_dir.chmod(0o777)  # as outputs/: the container may write as another user
    env = dict(os.environ)
    log_path = case_file(out_dir, record.case, ".log")
    if settings.mode == "docker":
        container = container_name(record.case)
        argv = build_docker_argv(settings.target, container, inputs, outputs, settings.gpu, settings.memory,
                                 settings.shm_size, settings.docker, timings_dir)
        record.argv, record.container_name = argv, container
        return PreparedRun(case_dir, inputs, outputs, log_path, {"args": argv}, env, timings_dir, container)
    env.update(INPUT_DIR=str(inputs), OUTPUT_DIR=str(outputs),
               # The command runs on the GPU that is sampled (NVML numbering = PCI bus order).
               CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=str(settings.gpu))
    if timings_dir is not None:
        env["TIMINGS_JSON"] = str(timings_dir / TIMINGS_NAME)
    record.command, record.workdir = settings.target, str(settings.workdir)
    return PreparedRun(case_dir, inputs, outputs, log_path, {"args": settings.target, "shell": True}, env,
                       timings_dir)


def supervise(run: PreparedRun, settings: Settings, sampler: SamplerProcess) -> Outcome:
    """Start the run with the sampler following its process tree (and the container's), wait for it at most
    --timeout (then kill it), kill whatever it left behind, and stop the sampler. Ctrl-C or a harness fault: the
    run, its container and the sampler are stopped and the case's folder removed before it is raised again."""
    process, timed_out, found, lock = None, False, {}, threading.Lock()
    follower, returncode, launch_error = None, None, None
    try:
        with open(run.log_path, "wb") as log:
            start = time.time()
            try:
                process = subprocess.Popen(**run.popen_args, cwd=settings.workdir, env=run.env,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            except OSError as error:
                launch_error = f"cannot launch: {error}"
            if process is not None:
                sampler.follow(process.pid)
                if run.container:
                    follower = threading.Thread(target=_follow_container, daemon=True,
                                                args=(run.container, settings.docker, process, sampler, lock, found))
                    follower.start()
                try:
                    returncode = process.wait(timeout=settings.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    kill_run(process, run.container, settings.docker)
                    returncode = process.returncode
            end = time.time()
    except BaseException:  # Ctrl-C or a harness bug: leave no run or container behind
        if process is not None and process.poll() is None:
            kill_run(process, run.container, settings.docker)
        sampler.kill()
        shutil.rmtree(run.case_dir, ignore_errors=True)
        raise
    finally:
        if follower is not None:
            follower.join(timeout=10)
    # Whatever the run left behind (escaped from its session, re-parented to us) must not outlive it.
    leftovers = kill_leftovers({sampler.process.pid})
    with lock:
        try:
            samples = sampler.stop()
        except SamplerError as error:
            samples = {"sampler_error": str(error)}
    return Outcome(start, end, returncode, timed_out, launch_error, found.get("container_pid"), len(leftovers),
                   samples)


def collect(record: CaseRecord, run: PreparedRun, outcome: Outcome, out_dir: Path, settings: Settings) -> None:
    """Into `record`: the times, the sampler's series, the engine's timeline (--timeline); the case's mask moved to
    OUT/predictions/."""
    record.time, record.launch_time, record.end_time = outcome.end - outcome.start, outcome.start, outcome.end
    record.returncode, record.container_pid = outcome.returncode, outcome.container_pid
    record.leftover_processes_killed = outcome.leftovers
    if run.timings_dir is not None:
        report = engine_report(run.timings_dir / TIMINGS_NAME)
        record.timeline = engine_timeline(report, outcome.start, outcome.end)
        if report is not None:  # the case's stage seconds, patch, ... and the model's load time
            record.engine_case = dict(next(iter(report["cases"].values())), model_load_s=report["model_load_s"])
    samples = outcome.samples
    for key in SERIES:
        setattr(record, key, samples.get(key) or [])
    for key in ("gpu_memory", "gpu_utilization"):
        if not any(value is not None for value in getattr(record, key)):
            setattr(record, key, [])  # no GPU sampled: empty, not a list of nulls
    record.gpu_index, record.gpu_name = samples.get("gpu_index"), samples.get("gpu_name")
    record.sampler_error, record.followed_pids = samples.get("sampler_error"), samples.get("followed_pids")
    record.interval_s = samples.get("interval_s") or settings.interval_s
    prediction = run.outputs / f"{record.case}.nii.gz"
    record.output_found = prediction.is_file() and prediction.stat().st_size > 0
    if record.output_found:
        predictions = out_dir / "predictions"
        predictions.mkdir(parents=True, exist_ok=True)
        shutil.move(str(prediction), str(predictions / prediction.name))


def classify(record: CaseRecord, outcome: Outcome, run: PreparedRun, settings: Settings) -> None:
    """The case's status and, for a failed case, the one line that says why (failure_cause): a case passes only
    with exit code 0, its mask written and samples taken."""
    samples = outcome.samples
    if outcome.launch_error is not None:
        record.status, record.error = "launch_error", outcome.launch_error
    elif outcome.timed_out:
        record.status, record.error = "timeout", f"killed after {settings.timeout_s:g} s"
    elif outcome.returncode != 0:
        record.status = "nonzero_exit"
        record.error = f"exit code {outcome.returncode}: {failure_cause(run.log_path)}".rstrip(": ")
    elif not record.output_found:
        record.status, record.error = "no_output", f"no {record.case}.nii.gz in the outputs folder"
    elif samples.get("sampler_error") and not samples.get("timestamps"):
        record.status, record.error = "sampler_error", samples["sampler_error"]
    else:
        record.status = "ok"
        if samples.get("sampler_error"):  # e.g. NVML failed in the sampler: say why GPU columns are empty
            record.error = f"sampler: {samples['sampler_error']}"


def run_case(case: str, image: Path, settings: Settings, out_dir: Path) -> CaseRecord:
    """Run one case with the sampler around it: prepare, supervise, collect, classify; returns its record."""
    record = CaseRecord(name=image.name, case=case, mode=settings.mode)
    run = prepare_run(record, image, settings, out_dir)
    try:
        sampler = SamplerProcess(run.case_dir / "samples.json", settings.gpu if settings.sample_gpu else None,
                                 settings.interval_s)
    except SamplerError as error:
        shutil.rmtree(run.case_dir, ignore_errors=True)
        record.status, record.error = "sampler_error", str(error)
        return record
    outcome = supervise(run, settings, sampler)
    collect(record, run, outcome, out_dir, settings)
    classify(record, outcome, run, settings)
    shutil.rmtree(run.case_dir, ignore_errors=True)  # files a container wrote as root may stay behind
    return record


# -------------------------------------------------------------------------------------------------- info

def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def _docker_server_version(docker: str) -> str | None:
    try:
        result = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def run_info(settings: Settings, gpu_info: dict | None, gpu_note: str | None, args) -> dict:
    """Run-level facts stored with the numbers: GPU (NVML name), host, date, settings."""
    return {
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": machine_facts(),
        "gpu_index": settings.gpu,
        "gpu": gpu_info,
        "gpu_name": gpu_info["name"] if gpu_info else None,
        "gpu_note": gpu_note,
        "mode": settings.mode,
        "image": docker_image_ref(settings.target) if settings.mode == "docker" else None,
        "command": settings.target if settings.mode == "command" else None,
        "workdir": str(settings.workdir) if settings.mode == "command" else None,
        "container_engine": Path(settings.docker).name if settings.mode == "docker" else None,
        "docker_server_version": _docker_server_version(settings.docker) if settings.mode == "docker" else None,
        "timeline": settings.timeline,
        "docker_memory": settings.memory if settings.mode == "docker" else None,
        "docker_shm_size": settings.shm_size if settings.mode == "docker" else None,
        "cases_dir": str(Path(args.cases).resolve()),
        "timeout_s": settings.timeout_s,
        "interval_s": settings.interval_s,
        "time_limit_s": args.time_limit,
        "gpu_limit_mb": args.gpu_limit_mb,
        "harness_commit": _git_commit(),
    }


# --------------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    parser = OneLineParser(
        prog=program_name("evaluation.run_efficiency", "flare-efficiency"),
        description="Run a FLARE container or a local command once per case and measure time, GPU memory, "
                    "CPU and RAM like the official FLARE efficiency scripts.")
    parser.add_argument("--cases", required=True, type=Path,
                        help="folder of <case>_0000.nii.gz files (or a FLARE dataset root with images/)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--docker", metavar="IMAGE",
                        help="image to run with the official command (':latest' added when no tag is given)")
    target.add_argument("--command", metavar="CMD",
                        help="shell command run per case with INPUT_DIR/OUTPUT_DIR set, e.g. 'sh predict.sh'")
    parser.add_argument("--out", required=True, type=Path, help="results folder")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use and sample (0)")
    parser.add_argument("--no-gpu", action="store_true", help="do not sample GPU memory (GPU columns empty)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed (600)")
    parser.add_argument("--time-limit", type=float, default=45.0, help="time tolerance in seconds (45)")
    parser.add_argument("--gpu-limit-mb", type=float, default=4096.0, help="GPU memory tolerance in MB (4096)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples (0.1)")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT,
                        help="working directory of --command (the repository root)")
    parser.add_argument("--engine", default="docker",
                        help="container client that runs the official command: docker (default) or podman, "
                             "which takes the same arguments")
    parser.add_argument("--timeline", action="store_true",
                        help="record the engine's start-up and stage timestamps (adds TIMINGS_JSON and a "
                             "timings mount to the command) and draw them on each case's figure")
    parser.add_argument("--memory", default="28G", help="docker -m value (28G; FLARE25 lite used 8G)")
    parser.add_argument("--shm-size", default="28gb", help="docker --shm-size value (28gb)")
    parser.add_argument("--max-cases", type=int, default=None, help="only the first N cases (sorted by name)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"run_efficiency: {message}", file=sys.stderr, flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def remove_earlier_results(out_dir: Path) -> int:
    """Empty the harness's own folders of an earlier run into `out_dir` (cases/, predictions/; only where its
    run_info.json says a run of the harness made them): a mask or a log left there would be read as this run's.
    Returns how many files were removed."""
    removed = 0
    if not (out_dir / "run_info.json").is_file():
        return removed
    for folder in (out_dir / "cases", out_dir / "predictions"):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() or path.is_symlink():
                    path.unlink()
                    removed += 1
    return removed


def main(argv=None) -> int:
    args = parse_args(argv)
    # `kill` (SIGTERM/SIGHUP) ends the harness like Ctrl-C: the run's own session would outlive it otherwise.
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)
    subreaper = become_subreaper()
    from tqdm import tqdm
    from evaluation import efficiency_report as report

    try:
        cases = find_cases(args.cases)
        if args.timeout <= 0 or args.interval <= 0:
            raise HarnessError("--timeout and --interval must be positive")
        if args.docker is not None and shutil.which(args.engine) is None:
            raise HarnessError(f"{args.engine}: container client not found on PATH")
        if args.command is not None and not args.workdir.is_dir():
            raise HarnessError(f"{args.workdir}: --workdir is not a folder")
    except HarnessError as error:
        _say(str(error))
        return USAGE_EXIT
    if args.max_cases is not None:
        cases = cases[:args.max_cases]

    gpu_info, gpu_note = None, None
    if args.no_gpu:
        gpu_note = "GPU memory not sampled (--no-gpu)"
    else:
        try:
            _, gpu_info = open_gpu(args.gpu)
            close_gpu()
        except GpuUnavailable as error:
            gpu_note = f"{error}: GPU memory is not sampled, GPU columns stay empty"
            _say(gpu_note)
    settings = Settings(mode="docker" if args.docker is not None else "command",
                        target=args.docker if args.docker is not None else args.command, gpu=args.gpu,
                        sample_gpu=gpu_info is not None, timeout_s=args.timeout, interval_s=args.interval,
                        workdir=args.workdir.resolve(), memory=args.memory, shm_size=args.shm_size,
                        docker=shutil.which(args.engine) or args.engine, timeline=args.timeline)

    out_dir = args.out.resolve()
    removed = remove_earlier_results(out_dir)
    if removed:
        _say(f"removed {removed} file(s) of an earlier run from {out_dir / 'cases'} and {out_dir / 'predictions'}")
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    info = run_info(settings, gpu_info, gpu_note, args)
    info["subreaper"] = subreaper  # False: a process that escapes a run's session can outlive it
    report.write_json(info, out_dir / "run_info.json")

    records = []
    progress = tqdm(cases, unit="case", desc="efficiency", file=sys.stderr, disable=not sys.stderr.isatty())
    for case, image in progress:
        progress.set_postfix_str(case)
        try:
            record = run_case(case, image, settings, out_dir)
        except KeyboardInterrupt:
            progress.close()
            _say(f"interrupted during {image.name}; {len(records)} case(s) done are in {out_dir}")
            report.build_report(out_dir, records, args.time_limit, args.gpu_limit_mb, plots=False)
            return 130
        record.time_limit_s, record.gpu_limit_mb, record.gpu_name = args.time_limit, args.gpu_limit_mb, info["gpu_name"]
        record.figures = report.case_row(record, args.time_limit, args.gpu_limit_mb)
        report.write_json(record.to_json(), case_file(out_dir, case, ".json"))
        records.append(record)
        if not record.ok:
            progress.write(f"run_efficiency: {image.name}: {record.status}: {record.error}", file=sys.stderr)
        elif progress.disable:  # a log, not a terminal: one line a case
            _say(f"{image.name}: ok, {record.time:.2f} s")
    progress.close()
    try:
        (out_dir / "work").rmdir()  # left only when a container wrote files we may not delete
    except OSError:
        pass

    rows = report.build_report(out_dir, records, args.time_limit, args.gpu_limit_mb, plots=not args.no_plots)
    failed = [row["Name"] for row in rows if row["status"] != "ok"]
    info.update(finished_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                n_cases=len(rows), n_failed=len(failed), failed_cases=failed)
    report.write_json(info, out_dir / "run_info.json")
    print(report.format_table(rows))
    plots = "" if args.no_plots else f", {out_dir / report.SUMMARY_PNG}"
    _say(f"wrote {out_dir / report.CSV_NAME}{plots} and, per case, {out_dir / 'cases'}/<case>.json"
         f"{', .png' if not args.no_plots else ''} and .log; masks in {out_dir / 'predictions'}")
    if failed:
        _say(f"{len(failed)} of {len(rows)} case(s) failed: {', '.join(failed)}")
        return FAILED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
