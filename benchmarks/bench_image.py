"""Benchmark: the submission image itself, built and run as the FLARE organisers run it, on this machine.

In a podman image store of its own (a temporary folder; the machine's store is left alone):
1. build: `scripts/build_image.sh` from nothing (debootstrap, the stand-in base with CPU torch, the
   project image; podman and the host's pip caches already present), then again with nothing changed;
   image sizes;
2. the submission file: `podman save --format docker-archive | gzip` (what `docker save | gzip` makes),
   its size, then `gzip -dc | podman load` into a second empty store and one case run from the loaded image;
3. per case: the efficiency harness (`evaluation.run_efficiency --docker NAME --engine podman --timeline`)
   on FLARE-size phantoms (default 55 and 215 slices of 512 x 512): wall time from launch to the
   container's removal, as the official script measures it, with the engine's own timestamps (process
   start, imports done, model loaded, first window, mask written) placed on that timeline; the same cases
   through `sh predict.sh` on the host in the same run, so that the container's own cost is a difference
   of two measurements taken side by side;
4. with `--docker-client`, the 55-slice case once more through the `docker` client pointed at podman's
   Docker API (the literal official route on a machine without a Docker engine).

Writes results/image_<machine>_<date>.{json,md} and the harness folders (CSV, per-case PNGs with the
timeline, summary.png; no masks) under results/image_<machine>_<date>/.

    .venv/bin/python benchmarks/bench_image.py [--slices 55 215] [--docker-client] [--keep-store DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from phantoms import generate_flare_case, write_case
from flare_common.machine import machine_facts

REPO = Path(__file__).resolve().parent.parent


NAME = "flare-bench"
PHANTOM_SEED = 0
TIMELINE_POINTS = [  # (label, timeline key): the start-up, as the issue asks it to be reported
    ("python process started", "process_start"),
    ("imports done", "imports_done"),
    ("model loaded", "model_loaded"),
    ("image read", "read"),
    ("first window (network starts)", "network_start"),
    ("network done", "network"),
    ("mask written", "write"),
    ("container gone (run returned)", "ended"),
]


def say(message: str) -> None:
    print(f"bench_image: {message}", file=sys.stderr, flush=True)


def store_env(root: Path) -> dict:
    """Environment for podman (and the scripts) with an image store under `root` and no shared caches."""
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n')
    env = dict(os.environ)
    env.update(CONTAINERS_STORAGE_CONF=str(conf), FLARE_IMAGE_CACHE=str(root / "cache"),
               CONTAINERS_CONF=str(REPO / "scripts" / "container" / "containers.conf"))
    return env


def remove_store(work: Path, env) -> None:
    """Remove the images and the folder; podman leaves its storage driver's folder mounted."""
    subprocess.run(["podman", "rmi", "-a", "-f"], env=env, capture_output=True)
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(str(work))]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


def timed(argv, env, **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{result.stderr[-3000:]}")
    return seconds, result


def image_bytes(reference: str, env) -> int:
    return int(timed(["podman", "image", "inspect", "--format", "{{.Size}}", reference], env)[1].stdout)


def build(env) -> dict:
    say("cold build (debootstrap, stand-in base, project image): a few minutes")
    cold_s, cold = timed(["bash", "scripts/build_image.sh", NAME], env)
    say(f"cold build {cold_s:.0f} s; cached rebuild")
    cached_s, cached = timed(["bash", "scripts/build_image.sh", NAME], env)
    base = re.search(r"localhost/flare-standin-base:\w+", cold.stderr).group(0)
    return {"cold_build_s": round(cold_s, 1), "cached_build_s": round(cached_s, 1),
            "cold_build_log": cold.stderr.strip().splitlines(), "cached_build_log": cached.stderr.strip().splitlines(),
            "image_bytes": image_bytes(f"{NAME}:latest", env), "base_image": base, "base_bytes": image_bytes(base, env)}


def save_and_load(env, work: Path, case_image: Path) -> dict:
    archive = work / f"{NAME}.tar.gz"
    say("save | gzip")
    start = time.perf_counter()
    with open(archive, "wb") as out:
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", f"{NAME}:latest"], env=env,
                                stdout=subprocess.PIPE)
        gzipped = subprocess.run(["gzip", "-c"], stdin=save.stdout, stdout=out)
        save.stdout.close()
        if save.wait() != 0 or gzipped.returncode != 0:
            raise RuntimeError("podman save | gzip failed")
    save_s = time.perf_counter() - start
    clean = store_env(work / "clean-store")
    say("load into an empty store")
    # podman 4.3's `load -i` does not recognise a gzipped docker-archive (Docker's does): unzip the stream.
    load_s, _ = timed(["bash", "-c", f"gzip -dc '{archive}' | podman load"], clean)
    folders = work / "loaded-run"
    (folders / "inputs").mkdir(parents=True)
    (folders / "outputs").mkdir()
    shutil.copy2(case_image, folders / "inputs" / case_image.name)
    run_s, _ = timed(["podman", "container", "run", "--shm-size=28gb", "-m", "28G", "--gpus=device=0", "--name",
                      NAME, "--rm", "-v", f"{folders}/inputs/:/workspace/inputs/", "-v",
                      f"{folders}/outputs/:/workspace/outputs/", f"{NAME}:latest", "/bin/bash", "-c",
                      "sh predict.sh"], clean)
    outputs = sorted(p.name for p in (folders / "outputs").iterdir())
    remove_store(work / "clean-store", clean)
    return {"archive_bytes": archive.stat().st_size, "save_gzip_s": round(save_s, 1), "load_s": round(load_s, 1),
            "loaded_image_run_s": round(run_s, 1), "loaded_image_outputs": outputs,
            "loaded_image_ok": outputs == [case_image.name.replace("_0000.nii.gz", ".nii.gz")]}


def flare_cases(slices: list[int], folder: Path) -> Path:
    images = folder / "images"
    for count in slices:
        write_case(generate_flare_case(PHANTOM_SEED, count), folder)
    return images


def harness(cases: Path, out: Path, env, target: list[str]) -> list[dict]:
    argv = [sys.executable, "-m", "evaluation.run_efficiency", "--cases", str(cases), "--out", str(out),
            "--timeline", "--no-gpu", *target]
    subprocess.run(argv, env=env, cwd=REPO, check=False, capture_output=True)
    records = []
    for path in sorted((out / "cases").glob("*.json")):
        record = json.loads(path.read_text())
        records.append({"case": record["case"], "status": record["status"], "time_s": round(record["time"], 2),
                        "timeline": record.get("timeline"), "error": record.get("error")})
    shutil.rmtree(out / "predictions", ignore_errors=True)  # masks are not results
    return records


def docker_client_env(env, socket: Path) -> dict:
    """`env` with DOCKER_HOST at podman's Docker API for this store (a service of its own on `socket`:
    one serving the machine's store would not see this store's image)."""
    env = {**env, "PODMAN_DOCKER_SOCKET": str(socket)}
    script = '. scripts/container/podman_env.sh && start_docker_api && echo "$DOCKER_HOST"'
    started = subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return {**env, "DOCKER_HOST": started.stdout.strip().splitlines()[-1]}


def stop_docker_api(socket: Path) -> None:
    try:
        os.kill(int(Path(f"{socket}.pid").read_text()), 15)
    except (OSError, ValueError):
        pass


def markdown(result: dict) -> str:
    build_, submission = result["build"], result["submission"]
    gb = 1e9
    lines = [f"# The submission image on {result['machine']['cpu']} ({result['machine']['cores']} cores, no GPU)", "",
             f"Date {result['machine']['date']}; command `{result['command']}`; {result['podman']}; "
             "base: the local stand-in (Debian bookworm, Python 3.11, torch 2.13.0+cpu), not the CUDA base.", "",
             "## Build and submission file", "",
             "| what | value |", "|---|---|",
             f"| cold build (empty store; debootstrap + stand-in base + image) | {build_['cold_build_s']:.0f} s |",
             f"| rebuild with nothing changed | {build_['cached_build_s']:.0f} s |",
             f"| image (uncompressed, podman) | {build_['image_bytes'] / gb:.2f} GB, of which stand-in base "
             f"{build_['base_bytes'] / gb:.2f} GB |",
             f"| `save --format docker-archive \\| gzip` | {submission['archive_bytes'] / gb:.2f} GB in "
             f"{submission['save_gzip_s']:.0f} s |",
             f"| load into an empty store | {submission['load_s']:.0f} s |",
             f"| one case ({result['cases'][0]['case']}) from the loaded image, official arguments | "
             f"{submission['loaded_image_run_s']:.1f} s, outputs {submission['loaded_image_outputs']} |", "",
             "## Per case (official arguments through podman; `sh predict.sh` on the host in the same run)", "",
             "| case | container (launch to removal) | host `sh predict.sh` | container's own cost |",
             "|---|---|---|---|"]
    host = {row["case"]: row for row in result["host"]}
    for row in result["cases"]:
        other = host.get(row["case"], {})
        extra = f"{row['time_s'] - other['time_s']:+.2f} s" if "time_s" in other else "-"
        lines.append(f"| {row['case']} | {row['time_s']:.2f} s ({row['status']}) | "
                     f"{other.get('time_s', float('nan')):.2f} s | {extra} |")
    lines += ["", "The container's own cost (creation, mounts, the interpreter's start inside it, removal) is the "
              "difference of two runs taken one after the other; on this shared machine a difference under about "
              "a second is within run-to-run noise."]
    first = result["cases"][0]
    lines += ["", f"## Start-up timeline of {first['case']} (seconds since launch, engine timestamps)", "",
              "| point | container | host |", "|---|---|---|"]
    host_first = host.get(first["case"], {}).get("timeline") or {}
    for label, key in TIMELINE_POINTS:
        inside = (first.get("timeline") or {}).get(key)
        outside = host_first.get(key)
        lines.append(f"| {label} | {'-' if inside is None else f'{inside:.2f}'} | "
                     f"{'-' if outside is None else f'{outside:.2f}'} |")
    if result.get("docker_client"):
        row = result["docker_client"][0]
        lines += ["", "## The `docker` client through podman's Docker API", "",
                  f"{row['case']}: {row['time_s']:.2f} s ({row['status']}), against {first['time_s']:.2f} s "
                  "through podman itself. podman 4.3's API service busy-waits on the container while `docker run` "
                  "waits for it (podman issue #18150, fixed in later releases), taking one of this machine's two "
                  "cores from the engine: time the image with `--engine podman` here, and with docker on a "
                  "machine with a Docker engine."]
    lines += ["", f"Per-case figures (timeline, CPU, RSS): `{result['figures']}/container/cases/*.png`; the harness "
              "CSVs beside them. The machine is shared; timings vary by 10-25 % from run to run.", ""]
    return "\n".join(lines)


def rewrite_markdown(json_path: Path) -> None:
    """The .md beside a results .json, from it (after a change to the markdown only)."""
    json_path.with_suffix(".md").write_text(markdown(json.loads(json_path.read_text())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[55, 215], help="FLARE case sizes (55 215)")
    parser.add_argument("--docker-client", action="store_true",
                        help="also time the first case through the docker client and podman's Docker API")
    parser.add_argument("--keep-store", type=Path, default=None,
                        help="build in this folder's store and keep it (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args(argv)

    facts = machine_facts()
    work = args.keep_store or Path(tempfile.mkdtemp(prefix="bench_image_"))
    env = store_env(work / "store")
    tag = f"{re.sub(r'[^a-z0-9]+', '-', facts['cpu'].lower()).strip('-')}_{facts['date'][:10]}"
    figures = args.out / f"image_{tag}"
    try:
        say(f"phantoms of {args.slices} slices")
        cases = flare_cases(args.slices, work / "phantoms")
        result = {"machine": facts, "command": "python benchmarks/bench_image.py " + " ".join(sys.argv[1:]),
                  "podman": subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip(),
                  "build": build(env)}
        result["submission"] = save_and_load(env, work, sorted(cases.iterdir())[0])
        shutil.rmtree(figures, ignore_errors=True)
        say("per case: container (podman, official arguments)")
        result["cases"] = harness(cases, figures / "container", env, ["--docker", NAME, "--engine", "podman"])
        say("per case: sh predict.sh on the host")
        result["host"] = harness(cases, figures / "host", env, ["--command", "sh predict.sh"])
        if args.docker_client:
            say("first case through the docker client (slow: see the results file)")
            first = work / "first-case"
            first.mkdir(exist_ok=True)
            shutil.copy2(sorted(cases.iterdir())[0], first)
            socket = work / "api" / "docker.sock"
            try:
                result["docker_client"] = harness(first, figures / "docker-client", docker_client_env(env, socket),
                                                  ["--docker", NAME, "--engine", "docker"])
            finally:
                stop_docker_api(socket)
        result["figures"] = str(figures.relative_to(REPO)) if figures.is_relative_to(REPO) else str(figures)
    finally:
        if args.keep_store is None:
            remove_store(work, env)
    stem = args.out / f"image_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(row["status"] == "ok" for row in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
