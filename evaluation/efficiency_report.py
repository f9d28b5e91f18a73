"""Efficiency figures, CSV and plots from the per-case sample records of `evaluation.run_efficiency`.

A record is a case_record.CaseRecord, on disk the per-case JSON: the official keys `gpu_memory` (MB per sample),
`cpu_list` ([user %, system %, idle %] per sample), `RAM_list` (MB) and `time` (s), plus ours (`tree_rss_mb`,
`tree_cpu_percent`, `timestamps`, `launch_time`, `interval_s`, `status`, ...).

Figures are rounded like the official `load_json.py`: Time to 2 decimals, MaxGPU_Mem and the AUCs of GPU
memory and RAM to integers (`np.round`, half to even), CPU figures and MaxRAM to 2 decimals.

Regenerate the CSV and the plots of a finished run: `python -m evaluation.efficiency_report OUT_DIR`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from flare_common.files import atomic_path, write_json_atomically

from evaluation.case_record import CaseRecord

OFFICIAL_COLUMNS = ["Name", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "MaxCPU_Utilization", "AUC_CPU_Time",
                    "MaxRAM", "AUC_RAM_Time"]
OUR_COLUMNS = ["time_over_limit", "gpu_mem_over_auc", "pass_time", "pass_gpu", "status", "output_found",
               "error", "case", "returncode", "gpu_mem_before_mb", "MeanGPU_Util_Percent", "MaxTreeCPU_Percent",
               "AUC_TreeCPU_Time", "MaxTreeRSS_MB", "AUC_TreeRSS_Time", "n_samples"]
COLUMNS = OFFICIAL_COLUMNS + OUR_COLUMNS
DEFAULT_TIME_LIMIT_S = 45.0
DEFAULT_GPU_LIMIT_MB = 4096.0
CSV_NAME = "efficiency.csv"
SUMMARY_PNG = "summary.png"


# ------------------------------------------------------------------------------------------------- figures

def _valid(samples) -> list:
    return [float(v) for v in (samples or []) if v is not None and not math.isnan(float(v))]


def auc(samples, interval: float = 0.1, decimals: int = 0) -> float:
    """Area under a sampled curve as the official script computes it: round(sum(samples) * interval).

    NaN when there is no sample (no GPU); failed readings (None) are left out.
    """
    values = _valid(samples)
    return float(np.round(sum(values) * interval, decimals)) if values else math.nan


def over_limit_auc(samples, limit: float, interval: float = 0.1) -> float:
    """Area above `limit`: round(sum(max(0, s - limit)) * interval), e.g. GPU MB*s over the 4 GB tolerance."""
    values = _valid(samples)
    return float(np.round(sum(max(0.0, v - limit) for v in values) * interval)) if values else math.nan


def peak(samples, decimals: int = 0) -> float:
    """Largest sample, rounded; NaN when there is none."""
    values = _valid(samples)
    return float(np.round(max(values), decimals)) if values else math.nan


def mean(samples, decimals: int = 1) -> float:
    """Mean of the samples, rounded; NaN when there is none."""
    values = _valid(samples)
    return float(np.round(np.mean(values), decimals)) if values else math.nan


def time_over_limit(seconds: float, limit_s: float) -> float:
    """Seconds beyond the tolerance: max(0, time - limit), 2 decimals."""
    return float(np.round(max(0.0, seconds - limit_s), 2))


def official_cpu_used(cpu_list) -> list:
    """The official CPU utilisation per sample: 100 - idle % of [user %, system %, idle %]."""
    return [100.0 - sample[2] for sample in (cpu_list or []) if sample is not None]


def case_file(out_dir: Path, case: str, suffix: str) -> Path:
    """A case's own file in the results folder: cases/<case>.log, .json, .png (the case without _0000)."""
    return Path(out_dir) / "cases" / f"{case}{suffix}"


def case_row(record: CaseRecord, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
             gpu_limit_mb: float = DEFAULT_GPU_LIMIT_MB) -> dict:
    """One CSV row (all of COLUMNS) from a per-case record."""
    interval = record.interval_s
    seconds = float(record.time)
    gpu = record.gpu_memory
    cpu_used = official_cpu_used(record.cpu_list)
    max_gpu = peak(gpu)
    ok = record.ok
    return {
        "Name": record.name,
        "Time": float(np.round(seconds, 2)),
        "MaxGPU_Mem": max_gpu,
        "AUC_GPU_Time": auc(gpu, interval),
        "MaxCPU_Utilization": peak(cpu_used, 2),
        "AUC_CPU_Time": auc(cpu_used, interval, 2),
        "MaxRAM": peak(record.RAM_list, 2),
        "AUC_RAM_Time": auc(record.RAM_list, interval),
        "time_over_limit": time_over_limit(seconds, time_limit_s),
        "gpu_mem_over_auc": over_limit_auc(gpu, gpu_limit_mb, interval),
        # a case whose command failed passes nothing: its time and memory are not those of a mask
        "pass_time": ok and bool(seconds <= time_limit_s),
        "pass_gpu": None if math.isnan(max_gpu) else ok and bool(max_gpu <= gpu_limit_mb),
        "status": record.status,
        "output_found": record.output_found,
        "error": record.error,
        "case": record.case,
        "returncode": record.returncode,
        "gpu_mem_before_mb": peak(gpu[:1]),
        "MeanGPU_Util_Percent": mean(record.gpu_utilization),
        "MaxTreeCPU_Percent": peak(record.tree_cpu_percent, 2),
        "AUC_TreeCPU_Time": auc(record.tree_cpu_percent, interval, 2),
        "MaxTreeRSS_MB": peak(record.tree_rss_mb, 2),
        "AUC_TreeRSS_Time": auc(record.tree_rss_mb, interval),
        "n_samples": len(record.timestamps or record.RAM_list),
    }


def json_safe(value):
    """`value` with NaN replaced by None (JSON has no NaN), through dicts and lists."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(data, path: Path) -> None:
    """Atomic JSON write, NaN as null."""
    write_json_atomically(path, json_safe(data))


# ---------------------------------------------------------------------------------------------- CSV, table

def rows_frame(rows: list[dict]):
    import pandas as pd
    return pd.DataFrame(rows, columns=COLUMNS)


def write_csv(rows: list[dict], path: Path) -> None:
    """The efficiency CSV (official columns first), written atomically; NaN/None are empty cells."""
    with atomic_path(path) as written:
        rows_frame(rows).to_csv(written, index=False)


def format_table(rows: list[dict]) -> str:
    """The final printed table: one line per case, the figures that matter."""
    columns = ["Name", "status", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "gpu_mem_over_auc", "MaxTreeRSS_MB",
               "MaxTreeCPU_Percent", "pass_time", "pass_gpu"]
    frame = rows_frame(rows)[columns].astype(object)
    frame = frame.map(lambda value: "-" if value is None or value != value else value)  # None/NaN -> "-"
    return frame.to_string(index=False)


# ------------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _seconds_from_launch(record: CaseRecord, n: int) -> np.ndarray:
    stamps = record.timestamps
    if len(stamps) == n and record.launch_time is not None:
        return np.asarray(stamps, dtype=float) - float(record.launch_time)
    return np.arange(n) * record.interval_s


def _series(values) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in (values or [])], dtype=float)


def timeline_segments(timeline: dict | None) -> list[tuple[str, float, float]]:
    """(label, start, end) in seconds since launch from a record's `timeline` (run_efficiency.engine_timeline):
    the start-up before the engine's first line of Python, its imports, the model load, each stage of the
    case, and the exit (process and container teardown) after the mask was written."""
    if not timeline:
        return []
    segments = []
    startup = [("container + interpreter start", 0.0, timeline.get("process_start")),
               ("imports", timeline.get("process_start"), timeline.get("imports_done")),
               ("model load", timeline.get("imports_done"), timeline.get("model_loaded"))]
    segments += [(label, begin, end) for label, begin, end in startup if begin is not None and end is not None]
    stages = [name[:-len("_start")] for name in timeline if name.endswith("_start")]
    segments += [(stage, timeline[f"{stage}_start"], timeline[stage]) for stage in stages if stage in timeline]
    last = max((end for _, _, end in segments), default=None)
    if last is not None and "ended" in timeline:
        segments.append(("exit + teardown", last, timeline["ended"]))
    return segments


def _plot_timeline(axis, segments: list[tuple[str, float, float]]) -> None:
    colours = _pyplot().get_cmap("tab20").colors
    for row, (label, begin, end) in enumerate(segments):
        axis.barh(row, max(end - begin, 0.0), left=begin, color=colours[row % len(colours)])
        axis.text(end, row, f"  {label} {end - begin:.2f} s", va="center", fontsize="x-small")
    axis.set_yticks([])
    axis.invert_yaxis()
    axis.set_ylabel("timeline")


def plot_case(record: CaseRecord, path: Path, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
              gpu_limit_mb: float = DEFAULT_GPU_LIMIT_MB) -> None:
    """Per case: the engine's timeline (with --timeline), the memory-time curve with the GPU limit line
    (only where GPU memory was sampled), and CPU and RSS of the process tree; time-limit mark on each."""
    plt = _pyplot()
    seconds = float(record.time)
    gpu = _series(record.gpu_memory)
    segments = timeline_segments(record.timeline)
    panels = (["timeline"] if segments else []) + (["gpu"] if np.isfinite(gpu).any() else []) + ["cpu"]
    heights = {"timeline": 0.25 * len(segments) + 0.6, "gpu": 3.0, "cpu": 3.0}
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 1.0 + sum(heights[p] for p in panels)), sharex=True,
                                gridspec_kw={"height_ratios": [heights[p] for p in panels]}, squeeze=False)
    axes = dict(zip(panels, axes[:, 0]))
    # A run far below the time limit would be squeezed against the left edge: the mark then stays off-scale.
    show_time_limit = seconds >= 0.25 * time_limit_s
    for axis in axes.values():
        if show_time_limit:
            axis.axvline(time_limit_s, color="tab:red", linestyle=":", label=f"{time_limit_s:g} s limit")
        axis.axvline(seconds, color="black", linewidth=0.8, label=f"run ended ({seconds:.1f} s)")
    if segments:
        _plot_timeline(axes["timeline"], segments)
    if "gpu" in axes:
        top = axes["gpu"]
        top.plot(_seconds_from_launch(record, len(gpu)), gpu, color="tab:blue", label="GPU memory used")
        top.set_ylim(0, max(np.nanmax(gpu), gpu_limit_mb) * 1.1)
        top.axhline(gpu_limit_mb, color="tab:red", linestyle="--", label=f"{gpu_limit_mb:g} MB limit")
        top.set_ylabel("GPU memory (MB, whole device)")
        top.legend(loc="upper left", fontsize="small")
    bottom = axes["cpu"]
    if not show_time_limit:
        bottom.text(0.99, 0.02, f"{time_limit_s:g} s limit off-scale ->", ha="right", va="bottom",
                    transform=bottom.transAxes, color="tab:red", fontsize="small")
    peak_text = f"{np.nanmax(gpu):.0f} MB" if np.isfinite(gpu).any() else "not sampled (no GPU)"
    axes[panels[0]].set_title(f"{record.name}  status={record.status or '?'}  time={seconds:.2f} s  "
                              f"peak GPU={peak_text}", fontsize="medium")
    cpu, rss = _series(record.tree_cpu_percent), _series(record.tree_rss_mb)
    bottom.plot(_seconds_from_launch(record, len(cpu)), cpu, color="tab:green", label="CPU % (process tree)")
    bottom.set_ylabel("CPU % (100 = one core)")
    bottom.set_xlabel("seconds since launch")
    bottom.legend(loc="upper left", fontsize="small")
    right = bottom.twinx()
    right.plot(_seconds_from_launch(record, len(rss)), rss, color="tab:orange", label="RSS MB (process tree)")
    right.set_ylabel("RSS (MB)")
    right.legend(loc="upper right", fontsize="small")
    right_edge = max(seconds, time_limit_s) if show_time_limit else seconds
    bottom.set_xlim(min(0.0, bottom.get_xlim()[0]), max(right_edge, record.interval_s) * 1.05)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_summary(rows: list[dict], path: Path, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                 gpu_limit_mb: float = DEFAULT_GPU_LIMIT_MB) -> None:
    """Bars of time (and, where GPU memory was sampled, peak GPU memory) per case against the limits: blue
    within the limit, red over it, hatched where the case failed; a legend says so."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    names = [row["case"] or row["Name"] for row in rows]
    failed = [row["status"] != "ok" for row in rows]
    peaks = [row["MaxGPU_Mem"] for row in rows]
    sampled = any(p is not None and not math.isnan(p) for p in peaks)
    width = max(6.0, 0.5 * len(rows) + 3)
    figure, axes = plt.subplots(1, 2 if sampled else 1, figsize=(2 * width if sampled else width, 5), squeeze=False)
    positions = np.arange(len(rows))

    def bars(axis, values, limit, ylabel, unit):
        values = np.asarray(values, dtype=float)
        colours = ["tab:red" if v > limit else "tab:blue" for v in np.nan_to_num(values)]
        drawn = axis.bar(positions, np.nan_to_num(values), color=colours)
        for bar, is_failed in zip(drawn, failed):
            if is_failed:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        axis.axhline(limit, color="tab:red", linestyle="--")
        axis.set_xticks(positions, names, rotation=90 if len(rows) > 6 else 0, fontsize="small")
        axis.set_ylabel(ylabel)
        legend = [Patch(color="tab:blue", label=f"within {limit:g} {unit}"),
                  Patch(color="tab:red", label=f"over {limit:g} {unit}")]
        if any(failed):
            legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="failed"))
        axis.legend(handles=legend, loc="upper right", fontsize="small")

    left = axes[0, 0]
    bars(left, [row["Time"] for row in rows], time_limit_s, "time (s)", "s")
    left.set_title("wall time per case, launch to end")
    if sampled:
        right = axes[0, 1]
        bars(right, [math.nan if p is None else p for p in peaks], gpu_limit_mb, "peak GPU memory (MB)", "MB")
        right.set_title("peak GPU memory per case (whole device)")
    else:
        figure.text(0.01, 0.01, "GPU memory not sampled (no NVML here): time only", fontsize="small",
                    color="grey")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    _save(figure, path)
    plt.close(figure)


def _save(figure, path: Path) -> None:
    with atomic_path(path) as written:
        figure.savefig(written, dpi=100)


# -------------------------------------------------------------------------------------------- regenerate

def case_json_paths(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "cases").glob("*.json"))


def build_report(out_dir: Path, records: list[CaseRecord], time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                 gpu_limit_mb: float = DEFAULT_GPU_LIMIT_MB, plots: bool = True) -> list[dict]:
    """Write efficiency.csv (and the per-case and summary PNGs) for `records`; returns the CSV rows."""
    out_dir = Path(out_dir)
    rows = [case_row(record, time_limit_s, gpu_limit_mb) for record in records]
    write_csv(rows, out_dir / CSV_NAME)
    if plots:
        for record in records:
            plot_case(record, case_file(out_dir, record.case, ".png"),
                      time_limit_s, gpu_limit_mb)
        if rows:
            plot_summary(rows, out_dir / SUMMARY_PNG, time_limit_s, gpu_limit_mb)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild efficiency.csv and the plots from OUT/cases/*.json.")
    parser.add_argument("out", type=Path, help="the --out folder of a run_efficiency run")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, help="seconds (45)")
    parser.add_argument("--gpu-limit-mb", type=float, default=DEFAULT_GPU_LIMIT_MB, help="MB (4096)")
    args = parser.parse_args(argv)
    paths = case_json_paths(args.out)
    if not paths:
        print(f"efficiency_report: {args.out / 'cases'}: no per-case JSON found", file=sys.stderr)
        return 2
    records = []
    for path in paths:
        try:
            records.append(CaseRecord.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as error:
            print(f"efficiency_report: {path}: unreadable JSON ({error})", file=sys.stderr)
            return 2
    rows = build_report(args.out, records, args.time_limit, args.gpu_limit_mb)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
