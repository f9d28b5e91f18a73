"""`--ray ADDRESS` against a real two-node Ray cluster on this machine, one node killed mid-batch.

The head (`ray start --head`, 2 cores) and a second node (`ray start --address=...`, 1 core, its own temp folder)
run as separate process groups of their own, as on two machines, with token authentication (Ray's default
since 2.52; every process gets the token from the environment). Two one-core workers, spread over both nodes;
the second node's raylet is killed (SIGKILL) while its worker is in the middle of a case: the batch finishes on
the head, every mask is written once and is the one the sequential CLI writes, the journal resumes a rerun, and
nothing stray is left in the output folder. Both nodes are stopped (every descendant of their `ray start`) when
the test ends. Ray reports its nodes at the machine's own address even when given 127.0.0.1; the cluster is reached
through 127.0.0.1.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from conftest import make_ct_image, make_toy_model

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (pip install '.[ray]')")
CASES = 6
FINE = ["--patch-size", "16", "16", "16", "--step-size", "0.1"]  # hundreds of windows a case: long enough to kill


@dataclass
class Cluster:
    address: str
    env: dict
    head: subprocess.Popen
    node: subprocess.Popen
    seen: set = field(default_factory=set)  # processes of the nodes seen during the test (stopped at the end)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in a process group of its own: stopping the group stops every process of the
    node (raylet, GCS, agents, workers), whatever Ray names them."""
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([ray, "start", *args, "--disable-usage-stats", "--block"], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def node_processes(leader: subprocess.Popen) -> list[psutil.Process]:
    """Every process of a node: its `ray start`'s descendants (workers start sessions of their own)."""
    try:
        return psutil.Process(leader.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_node(process: subprocess.Popen) -> None:
    for child in node_processes(process):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def wait_for_nodes(address: str, env: dict, count: int, timeout: float = 120) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster at {address} did not show {count} nodes within {timeout} s")


@pytest.fixture
def cluster(tmp_path):
    # Ray's socket paths must stay under 108 bytes: short temp folders of its own
    head_dir, node_dir = (Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")) for prefix in ("rh", "rn"))
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_scheduler_spread_threshold="0.0")  # the workers spread over both nodes
    address = f"127.0.0.1:{port}"
    head = start_node(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                       f"--temp-dir={head_dir}", "--include-dashboard=false"], env, tmp_path / "head.log")
    node = running = None
    try:
        wait_for_nodes(address, env, 1)
        node = start_node([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                           f"--temp-dir={node_dir}"], env, tmp_path / "node.log")
        wait_for_nodes(address, env, 2)
        running = Cluster(address, env, head, node)
        yield running
    finally:
        for process in (node, head):
            if process is not None:
                stop_node(process)
        for process in running.seen if running else ():
            try:  # a killed raylet's workers, which no `ray start` parents any more
                process.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_a_batch_survives_a_killed_node_of_a_real_cluster_and_a_rerun_resumes(cluster, tmp_path):
    images, model = tmp_path / "images", make_toy_model(tmp_path / "model")
    images.mkdir()
    for index in range(CASES):
        sitk.WriteImage(make_ct_image(shape_zyx=(20, 48, 48), seed=index), str(images / f"case{index}_0000.nii.gz"))
    common = ["-m", str(model), "--device", "cpu", "--backend", "torch", *FINE]
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "inference", "-i", str(images), "-o", str(reference), *common,
                           "--sequential", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out, journal = tmp_path / "out", tmp_path / "run.journal.jsonl"
    argv = [sys.executable, "-m", "inference", "-i", str(images), "-o", str(out), *common, "--ray", cluster.address,
            "--ray-workers", "2", "--journal", str(journal)]
    run = subprocess.Popen(argv, cwd=REPO, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    try:
        killed, deadline = None, time.time() + 300
        while killed is None and run.poll() is None and time.time() < deadline:
            try:
                node = node_processes(cluster.node)
                cluster.seen.update(node)
                busy = [p for p in node if "CaseWorker.predict" in " ".join(p.cmdline())]
                raylet = [p for p in node if p.name() == "raylet"]
            except psutil.NoSuchProcess:
                continue
            if busy and raylet:
                raylet[0].kill()  # the node, not only a worker: its raylet
                killed = raylet[0].pid
            time.sleep(0.1)
        _, stderr = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert killed is not None, f"no worker of the second node was seen at work; the run said:\n{stderr[-3000:]}"
    assert run.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    ours, theirs = masks(out), masks(reference)
    assert list(ours) == list(theirs) == [f"case{index}.nii.gz" for index in range(CASES)], stderr[-3000:]
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    assert sorted(p.name for p in out.iterdir()) == list(theirs)  # the masks only: no partial folder
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(e["input"] for e in entries if e["status"] == "ok") == sorted(str(p) for p in images.iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rerun = subprocess.run(argv, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{CASES} of {CASES} case(s) already done, 0 to go" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing computed again
