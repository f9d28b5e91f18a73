"""The machine a figure was measured on, recorded with every timing we publish."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_facts(**extra) -> dict:
    """CPU model and torch's vector level (the model name alone, "AMD EPYC", hid a 2.5x difference in speed
    between two of our machines), cores, memory, versions, date (UTC) and the load average at the start;
    `extra` adds a benchmark's own facts."""
    import psutil
    try:
        import torch
        capability, torch_version = torch.backends.cpu.get_cpu_capability(), torch.__version__
    except ImportError:
        capability = torch_version = None
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return {"cpu": cpu_model(), "cpu_capability": capability, "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch_version, "numpy": numpy_version,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, **extra}


def device_facts(device: str, **extra) -> dict:
    """machine_facts, with the GPU's name (`gpu`) where `device` is "cuda"."""
    if device == "cuda":
        import torch
        extra["gpu"] = torch.cuda.get_device_name(0)
    return machine_facts(**extra)


def cpu_label(facts: dict) -> str:
    """"AMD EPYC, torch CPU capability AVX512"; results from before the capability was recorded show the name
    only."""
    capability = facts.get("cpu_capability")
    return f"{facts['cpu']}, torch CPU capability {capability}" if capability else facts["cpu"]


def device_tag(name: str) -> str:
    """A device's name as part of a file name: "NVIDIA H200" -> "nvidia-h200", "AMD EPYC" -> "amd-epyc"."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
