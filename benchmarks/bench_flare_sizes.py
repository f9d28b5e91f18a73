"""Time, whole-device GPU peak and memory-time area of predict.sh on the 8 FLARE case sizes
(512x512x{55,100,150,215,334,448,499,554}), per backend, with per-stage times, through the efficiency
harness (one fresh run of `sh predict.sh` per case, as the organisers do).

    .venv/bin/python benchmarks/bench_flare_sizes.py [--backends torch onnx] [--device cuda] [--max-cases N]

Writes results/flare_sizes_<device>_<date>.json and .md (device name from NVML, else the CPU model).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from inference.timing import STAGE_ORDER as STAGES  # noqa: E402


def ensure_phantoms(data: Path) -> Path:
    images = data / "images"
    if not images.is_dir() or len(list(images.glob("*_0000.nii.gz"))) < 8:
        subprocess.run([sys.executable, "-m", "evaluation.phantoms", "--out", str(data), "--cases", "0",
                        "--seed", "0", "--flare-sizes"], cwd=REPO, check=True)
    return images


def run_backend(images: Path, backend: str, device: str, out: Path, max_cases: int | None,
                timeout: int) -> pd.DataFrame:
    timings_dir = out / "timings"
    timings_dir.mkdir(parents=True, exist_ok=True)
    # the harness runs the command through /bin/sh with INPUT_DIR set to a folder holding one case
    command = (f'TIMINGS_JSON="{timings_dir}/$(ls "$INPUT_DIR").json" BACKEND={shlex.quote(backend)} '
               f"DEVICE={shlex.quote(device)} sh predict.sh")
    argv = [sys.executable, "-m", "evaluation.run_efficiency", "--cases", str(images), "--command", command,
            "--out", str(out), "--timeout", str(timeout)]
    if max_cases:
        argv += ["--max-cases", str(max_cases)]
    subprocess.run(argv, cwd=REPO, check=False)
    table = pd.read_csv(out / "efficiency.csv")
    for stage in STAGES + ("model_load",):
        table[f"{stage}_s"] = float("nan")
    for i, name in enumerate(table["Name"]):
        path = timings_dir / f"{name}.json"
        if path.exists():
            report = json.loads(path.read_text())
            case = report["cases"].get(name, {})
            for stage in STAGES:
                table.loc[i, f"{stage}_s"] = case.get(stage, float("nan"))
            table.loc[i, "model_load_s"] = report.get("model_load_s", float("nan"))
    table.insert(0, "backend", backend)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "flare_sizes")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "flare_sizes_runs")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args()
    images = ensure_phantoms(args.data)
    tables = [run_backend(images, b, args.device, args.out / b, args.max_cases, args.timeout)
              for b in args.backends]
    table = pd.concat(tables, ignore_index=True)
    info = json.loads((args.out / args.backends[0] / "run_info.json").read_text())
    device_name = info.get("gpu_name") or info.get("cpu_model") or "unknown"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    tag = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    stem = REPO / "results" / f"flare_sizes_{tag}_{date}"
    stem.parent.mkdir(exist_ok=True)
    columns = ["backend", "Name", "status", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "pass_time", "pass_gpu",
               "MaxTreeRSS_MB", "model_load_s"] + [f"{s}_s" for s in STAGES]
    columns = [c for c in columns if c in table.columns]
    record = {"device": device_name, "date": date, "run_info": info,
              "rows": json.loads(table[columns].to_json(orient="records"))}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    header = (f"# predict.sh on the 8 FLARE case sizes\n\nDevice: **{device_name}**, {date}, host "
              f"{info.get('host', '?')}. Command: `{' '.join(sys.argv)}`.\n\n")
    stem.with_suffix(".md").write_text(header + table[columns].round(2).to_markdown(index=False) + "\n")
    print(table[columns].round(2).to_string(index=False))
    return 0 if (table["status"] == "ok").all() else 1


if __name__ == "__main__":
    sys.exit(main())
