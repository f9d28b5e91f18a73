"""One case of the efficiency harness, typed: what was run, how it ended, and the sampler's series. run_efficiency
fills it; efficiency_report reads it; on disk it is the per-case JSON (`cases/<case>.json`), whose official keys
(`gpu_memory`, `cpu_list`, `RAM_list`, `time`) are those of the FLARE organisers' load_json.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

STATUSES = ("ok", "nonzero_exit", "timeout", "no_output", "launch_error", "sampler_error")
# the sampler's series (evaluation.resource_sampler), one value per sample
SERIES = ("gpu_memory", "gpu_utilization", "cpu_list", "RAM_list", "timestamps", "tree_cpu_percent", "tree_rss_mb",
          "tree_processes")


@dataclass
class CaseRecord:
    name: str  # the input file's name
    case: str  # the case id
    mode: str  # "docker" (the official command, or podman's) or "command"
    status: str = ""  # one of STATUSES once classified
    error: str = ""  # the one line that says why a case failed (or a sampler note on a case that passed)
    output_found: bool = False
    returncode: int | None = None
    time: float = 0.0  # seconds from right before the launch to right after the run returned
    launch_time: float | None = None  # seconds since the epoch
    end_time: float | None = None
    time_limit_s: float | None = None
    gpu_limit_mb: float | None = None
    gpu_name: str | None = None
    gpu_index: int | None = None
    argv: list[str] | None = None  # docker mode
    container_name: str | None = None
    command: str | None = None  # command mode
    workdir: str | None = None
    container_pid: int | None = None
    leftover_processes_killed: int = 0
    interval_s: float = 0.1
    sampler_error: str | None = None
    followed_pids: list[int] | None = None
    timeline: dict | None = None  # the engine's start-up and stage times, seconds since launch (--timeline)
    engine_case: dict | None = None  # the engine's own report of the case (--timeline)
    gpu_memory: list = field(default_factory=list)  # MB of the whole device, per sample
    gpu_utilization: list = field(default_factory=list)
    cpu_list: list = field(default_factory=list)  # [user %, system %, idle %] per sample
    RAM_list: list = field(default_factory=list)  # MB
    timestamps: list = field(default_factory=list)
    tree_cpu_percent: list = field(default_factory=list)
    tree_rss_mb: list = field(default_factory=list)
    tree_processes: list = field(default_factory=list)
    figures: dict | None = None  # the case's CSV row (efficiency_report.case_row)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CaseRecord":
        """A record read back from its JSON; keys this version does not know are left out, a missing series is
        empty."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in SERIES:
            if values.get(key) is None:
                values[key] = []
        return cls(**values)
