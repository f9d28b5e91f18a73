"""Resource sampler of the efficiency harness, meant to run in its own process.

Every `interval` seconds (0.1 s, as the official FLARE script) one sample records:

- `gpu_memory`: used memory of the whole GPU in MB (MiB), NVML total - free, as the official script reads
  it through `pynvml.smi` (CUDA contexts and every other process on that GPU included);
- `gpu_utilization`: NVML's utilisation of that GPU in %, the share of its last sample period (1/6 s to 1 s by
  product) in which a kernel was running: how busy a batch keeps the GPU, not how much of it a kernel fills;
- `cpu_list`: system-wide CPU split `[user %, system %, idle %]` over the last interval and `RAM_list`:
  system-wide used RAM in MB, both with the official meaning (so the official `load_json.py` can read our
  JSON); the official script adds 0.1 s to the denominator of the CPU split, we do not;
- `tree_cpu_percent` / `tree_rss_mb` / `tree_processes`: CPU % (100 = one core busy), summed resident set
  size and process count of the followed process trees (the launched command and its descendants; for
  docker also the container's processes once `docker inspect` gave their host pid);
- `timestamps`: `time.time()` of the sample.

Samples follow a fixed schedule (tick k at start + k * interval), so `sum(samples) * interval` is the
area under the curve even when one sample takes a few milliseconds.

As a process: `python -m evaluation.resource_sampler --out samples.json [--gpu N] [--interval 0.1]`.
It takes a first sample, prints `ready` on stdout, then reads commands on stdin: `pid N` adds a process
tree to follow, `stop` (or end of input) writes the samples to --out and exits. `SamplerProcess` drives
it from the harness.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from flare_common.files import write_text_atomically

MIB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parent.parent


class GpuUnavailable(Exception):
    """NVML cannot be used or has no GPU with the requested index (the message is one line)."""


# ---------------------------------------------------------------------------------------------- GPU (NVML)

def open_gpu(index: int):
    """Initialise NVML and return (handle, info) of GPU `index` (NVML numbering, as docker's --gpus).

    info: name, index, uuid, memory_total_mb, driver_version. Raises GpuUnavailable with a one-line reason.
    """
    try:
        import pynvml
    except ImportError as error:  # the package is in requirements-dev.txt; keep going without it anyway
        raise GpuUnavailable(f"nvidia-ml-py is not installed ({error})") from None
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no usable GPU here
        raise GpuUnavailable(f"NVML unavailable: {error}") from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= index < count:
            raise GpuUnavailable(f"no GPU {index} (NVML sees {count} GPU(s))")
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        info = {"index": index, "name": _as_text(pynvml.nvmlDeviceGetName(handle)),
                "uuid": _as_text(pynvml.nvmlDeviceGetUUID(handle)),
                "memory_total_mb": memory.total / MIB,
                "driver_version": _as_text(pynvml.nvmlSystemGetDriverVersion())}
    except GpuUnavailable:
        close_gpu()
        raise
    except Exception as error:
        close_gpu()
        raise GpuUnavailable(f"NVML error on GPU {index}: {error}") from None
    return handle, info


def close_gpu() -> None:
    """Shut NVML down (best effort)."""
    try:
        import pynvml
        pynvml.nvmlShutdown()
    except Exception:
        pass


def read_gpu_used_mb(handle) -> float:
    """Used memory of the whole device in MB (MiB): NVML total - free, as the official `pynvml.smi` query."""
    import pynvml
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return (memory.total - memory.free) / MIB


def read_gpu_busy_percent(handle) -> float:
    """NVML's GPU utilisation in %: the share of the last sample period in which any kernel ran."""
    import pynvml
    return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------- processes (psutil)

@dataclass
class TreeUsage:
    """One reading of the followed process trees.

    cpu_seconds: cumulated user + system CPU seconds per process, keyed by (pid, create_time) so a reused
    pid is a new process; rss_mb: summed resident set size (shared pages count once per process).
    """
    cpu_seconds: dict = field(default_factory=dict)
    rss_mb: float = 0.0
    n_processes: int = 0


def process_tree(pid: int) -> list:
    """The process `pid` and all its descendants (psutil.Process objects); [] when it is gone."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def process_tree_usage(root_pids) -> TreeUsage:
    """CPU seconds and RSS of the trees under `root_pids` (an int or several); vanished processes skipped."""
    if isinstance(root_pids, int):
        root_pids = [root_pids]
    usage = TreeUsage()
    seen = set()
    for root in root_pids:
        for process in process_tree(root):
            if process.pid in seen:
                continue
            seen.add(process.pid)
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    rss = process.memory_info().rss
                    key = (process.pid, process.create_time())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            usage.cpu_seconds[key] = times.user + times.system
            usage.rss_mb += rss / MIB
            usage.n_processes += 1
    return usage


def tree_cpu_percent(previous: dict, current: dict, elapsed_s: float) -> float:
    """CPU % (100 = one core) between two `TreeUsage.cpu_seconds` readings `elapsed_s` apart.

    A process first seen now counts with all its CPU time (it was started by the run, most likely within
    the last interval); a process gone since the previous reading loses at most its last interval.
    """
    if elapsed_s <= 0:
        return 0.0
    used = sum(max(0.0, seconds - previous.get(key, 0.0)) for key, seconds in current.items())
    return 100.0 * used / elapsed_s


def system_cpu_split(previous, current) -> list:
    """[user %, system %, idle %] of the machine between two `psutil.cpu_times()` readings.

    Only these three fields, like the official script (iowait, irq, ... are left out of the total).
    """
    deltas = [current.user - previous.user, current.system - previous.system, current.idle - previous.idle]
    total = sum(deltas)
    if total <= 0:
        return [0.0, 0.0, 100.0]
    return [100.0 * delta / total for delta in deltas]


def system_ram_used_mb() -> float:
    """Used RAM of the whole machine in MB (psutil `virtual_memory().used`), the official RAM figure."""
    return psutil.virtual_memory().used / MIB


# ------------------------------------------------------------------------------------------------ sampling

@dataclass
class SampleSeries:
    """The raw samples, one entry per tick in every list (None where a reading failed)."""
    timestamps: list = field(default_factory=list)
    gpu_memory: list = field(default_factory=list)
    gpu_utilization: list = field(default_factory=list)
    cpu_list: list = field(default_factory=list)
    RAM_list: list = field(default_factory=list)
    tree_cpu_percent: list = field(default_factory=list)
    tree_rss_mb: list = field(default_factory=list)
    tree_processes: list = field(default_factory=list)


class ResourceProbe:
    """State carried between samples: the GPU handle, followed roots, previous CPU readings."""

    def __init__(self, gpu_handle=None):
        self.gpu_handle = gpu_handle
        self.gpu_error = None
        self.utilization_error = None
        self.roots: list[int] = []
        self._previous_tree: dict = {}
        self._previous_system = psutil.cpu_times()
        self._previous_time = time.monotonic()

    def follow(self, pid: int) -> None:
        if pid not in self.roots:
            self.roots.append(pid)

    def sample(self, series: SampleSeries) -> None:
        """Append one reading of everything to `series`."""
        now_wall, now = time.time(), time.monotonic()
        gpu = busy = None
        if self.gpu_handle is not None and self.gpu_error is None:
            try:
                gpu = read_gpu_used_mb(self.gpu_handle)
            except Exception as error:  # the GPU fell off the bus, driver reset...: keep CPU/RAM going
                self.gpu_error = f"NVML read failed: {error}"
        if self.gpu_handle is not None and self.gpu_error is None and self.utilization_error is None:
            try:
                busy = read_gpu_busy_percent(self.gpu_handle)
            except Exception as error:  # not supported (MIG instances, some vGPUs): memory is still sampled
                self.utilization_error = f"NVML utilisation not available: {error}"
        usage = process_tree_usage(self.roots)
        system = psutil.cpu_times()
        series.timestamps.append(now_wall)
        series.gpu_memory.append(gpu)
        series.gpu_utilization.append(busy)
        series.cpu_list.append(system_cpu_split(self._previous_system, system))
        series.RAM_list.append(system_ram_used_mb())
        series.tree_cpu_percent.append(tree_cpu_percent(self._previous_tree, usage.cpu_seconds,
                                                        now - self._previous_time))
        series.tree_rss_mb.append(usage.rss_mb)
        series.tree_processes.append(usage.n_processes)
        self._previous_tree, self._previous_system, self._previous_time = usage.cpu_seconds, system, now


def _read_commands(fd: int, buffer: bytearray, timeout: float) -> tuple[list[str], bool]:
    """Wait up to `timeout` s for command lines on `fd`; returns (complete lines, end of input)."""
    readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not readable:
        return [], False
    chunk = os.read(fd, 4096)
    if not chunk:
        return [buffer.decode().strip()] if buffer.strip() else [], True
    buffer.extend(chunk)
    *lines, rest = bytes(buffer).split(b"\n")
    buffer[:] = rest
    return [line.decode().strip() for line in lines], False


def run_sampler(out_path: Path, gpu_index: int | None, interval: float, command_fd: int, ready_stream) -> int:
    """The sampler process's main loop (see the module docstring for the protocol)."""
    result = {"interval_s": interval, "gpu_index": gpu_index, "gpu_name": None, "sampler_error": None,
              "followed_pids": []}
    handle = None
    if gpu_index is not None:
        try:
            handle, info = open_gpu(gpu_index)
            result["gpu_name"] = info["name"]
        except GpuUnavailable as error:
            result["sampler_error"] = str(error)
    probe, series = ResourceProbe(handle), SampleSeries()
    buffer = bytearray()
    probe.sample(series)
    print("ready", file=ready_stream, flush=True)
    start = time.monotonic()
    tick, done = 1, False
    while not done:
        deadline = start + tick * interval
        while not done:
            lines, done = _read_commands(command_fd, buffer, deadline - time.monotonic())
            for line in lines:
                if line == "stop":
                    done = True
                elif line.startswith("pid "):
                    probe.follow(int(line.split()[1]))
                    result["followed_pids"].append(int(line.split()[1]))
            if time.monotonic() >= deadline:
                break
        if done:
            break
        probe.sample(series)
        # A late tick (machine overloaded) skips the ticks it missed instead of sampling in a burst.
        tick = max(tick + 1, math.floor((time.monotonic() - start) / interval) + 1)
    if handle is not None:
        close_gpu()
    result.update(asdict(series))
    if probe.gpu_error:
        result["sampler_error"] = probe.gpu_error
    result["utilization_error"] = probe.utilization_error
    write_text_atomically(out_path, json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------- driving it from outside

class SamplerError(Exception):
    """The sampler process did not start or did not deliver its samples."""


class SamplerProcess:
    """A sampler subprocess: started (first sample taken) on construction, `follow(pid)`, then `stop()`."""

    def __init__(self, out_path: Path, gpu_index: int | None, interval: float = 0.1,
                 start_timeout_s: float = 60.0):
        self.out_path = Path(out_path)
        argv = [sys.executable, "-m", "evaluation.resource_sampler", "--out", str(self.out_path),
                "--interval", str(interval)]
        if gpu_index is not None:
            argv += ["--gpu", str(gpu_index)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT,
                                        env=env)
        readable, _, _ = select.select([self.process.stdout], [], [], start_timeout_s)
        line = self.process.stdout.readline() if readable else b""
        if line.strip() != b"ready":
            self.kill()
            raise SamplerError(f"the sampler process did not start (exit code {self.process.poll()})")

    def follow(self, pid: int) -> None:
        """Add the process tree under `pid` to what is sampled."""
        self._send(f"pid {pid}\n")

    def stop(self, timeout_s: float = 30.0) -> dict:
        """End sampling and return the samples (see `run_sampler`)."""
        try:
            self._send("stop\n")
            self.process.stdin.close()
            self.process.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
            raise SamplerError("the sampler process did not stop") from None
        finally:
            self.process.stdout.close()
        try:
            return json.loads(self.out_path.read_text())
        except (OSError, ValueError) as error:
            raise SamplerError(f"no samples from the sampler process ({error})") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _send(self, text: str) -> None:
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file written when sampling stops")
    parser.add_argument("--gpu", type=int, default=None, help="NVML index of the GPU to sample")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    args = parser.parse_args(argv)
    # Ctrl-C in the terminal reaches the whole process group: the harness decides when sampling ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return run_sampler(args.out, args.gpu, args.interval, sys.stdin.fileno(), sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
