"""Many cases on many workers, with Ray: `python -m inference -i IN -o OUT ... --ray [ADDRESS]`.

Workers are Ray actors, one per GPU (or one per `--ray-cpus` cores where there is no GPU), each loading the
model once and running the pipelined loop (batch.py) on the cases it is handed, a few at a time; Ray hands
the next cases to whichever worker is free. When a worker dies in the middle of a case, Ray starts it again
and hands it the same cases again (max_restarts, max_task_retries); masks are written atomically, so a case
done twice is still one whole mask. With no ADDRESS Ray starts on this machine and stops with the run; with
one (`ray start --head` on one node, `ray start --address HEAD:6379` on the others, or a KubeRay RayCluster
on Kubernetes) the run joins that cluster, whose nodes must see IN, OUT and the model folder at the same
paths (a shared file system).

A journal, kept outside the output folder (`OUT.journal.jsonl` unless `--journal`), gets a line per case as
it finishes; a rerun skips every case the journal says is done whose mask is there, so a batch that was
stopped resumes where it stopped and never computes a finished case again. Ray is imported here only: the
plain CLI never loads it (`pip install .[ray]`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from . import io
from .batch import CaseResult, predict_cases
from .errors import ModelError
from .pipeline import PredictionSettings

log = logging.getLogger("inference")
CASES_PER_TASK = 2  # pipelining within a worker, against retrying little when one dies


class Journal:
    """The cases a run finished (JSON lines: case file, mask, "ok" or the error, seconds, worker)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def finished(self) -> set[str]:
        """Input paths the journal records as done."""
        if not self.path.is_file():
            return set()
        done = set()
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short when the driver was killed
                continue
            if entry.get("status") == "ok":
                done.add(entry["input"])
        return done

    def record(self, entry: dict) -> None:
        with open(self.path, "a") as journal:
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())


def default_journal(output_dir: Path) -> Path:
    return Path(output_dir).resolve().parent / f"{Path(output_dir).resolve().name}.journal.jsonl"


def start_ray(address: str | None):
    """Ray on this machine (address None) or the cluster at `address`; quiet either way."""
    import ray

    options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    if address is None:
        # paths, not images, travel through Ray: a small object store is enough
        ray.init(object_store_memory=200 * 2 ** 20, **options)
    else:
        ray.init(address=address, **options)
    return ray


def worker_resources(ray, cpus_per_worker: int) -> tuple[int, dict]:
    """How many workers, and what each asks of Ray: a GPU each where the cluster has GPUs, else
    `cpus_per_worker` cores each."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(total.get("CPU", 1)) // cpus_per_worker), {"num_cpus": cpus_per_worker}


class CaseWorker:
    """A Ray actor: the model, loaded once; `predict` runs the pipelined loop on the cases it is given."""

    def __init__(self, model_args: dict, settings: dict):
        import torch

        from .model import load_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
        self.model = load_model(**model_args)
        self.settings = PredictionSettings(**settings)

    def predict(self, cases: list[tuple[str, str]]) -> list[CaseResult]:
        paths = [Path(case) for case, _ in cases]
        outputs = {Path(case): Path(output) for case, output in cases}
        return [replace(result, worker=os.getpid())
                for result in predict_cases(paths, outputs, self.model, self.settings)]


def journal_entry(result: CaseResult) -> dict:
    return {"input": str(result.path), "output": str(result.output), "worker": result.worker,
            "status": "ok" if result.error is None else "failed", "error": result.error,
            "seconds": result.report.seconds.get("total") if result.report is not None else None, "at": time.time()}


def predict_on_ray(cases: list[Path], outputs: dict[Path, Path], model_args: dict, settings: PredictionSettings,
                   address: str | None, cpus_per_worker: int, journal: Journal,
                   max_workers: int | None = None) -> Iterator[CaseResult]:
    """Predict `cases` on Ray workers, yielding each case's result as a worker finishes it (in no fixed
    order), once the journal has it. Cases the journal records as done, with their mask there, are skipped.
    Raises ModelError, at the first result asked for, when Ray is missing or does not start."""
    finished = journal.finished()
    todo = [path for path in cases if not (str(path) in finished and outputs[path].exists())]
    if len(todo) < len(cases):
        log.info("journal %s: %d of %d case(s) already done, %d to go", journal.path, len(cases) - len(todo),
                 len(cases), len(todo))
    if not todo:
        return
    try:
        ray = start_ray(address)
    except ImportError:
        raise ModelError("--ray: Ray is not installed (pip install '.[ray]' or pip install ray)") from None
    except Exception as err:  # ray.init raises ConnectionError, RuntimeError, ... by cause
        raise ModelError(f"--ray {address or '(local)'}: Ray did not start ({str(err).splitlines()[0]})") from None
    try:
        from ray.util import ActorPool

        count, resources = worker_resources(ray, cpus_per_worker)
        count = min(count, len(todo), max_workers or count)
        worker_class = ray.remote(max_restarts=-1, max_task_retries=3, **resources)(CaseWorker)
        plain = {key: value for key, value in asdict(settings).items() if key not in ("crop_function", "extra")}
        workers = [worker_class.remote(model_args, plain) for _ in range(count)]
        log.info("ray: %d worker(s), %s each; %d case(s)", count,
                 "one GPU" if "num_gpus" in resources else f"{resources['num_cpus']} core(s)", len(todo))
        tasks = [[(str(path), str(outputs[path])) for path in todo[start:start + CASES_PER_TASK]]
                 for start in range(0, len(todo), CASES_PER_TASK)]
        pool = ActorPool(workers)
        for results in pool.map_unordered(lambda worker, task: worker.predict.remote(task), tasks):
            for result in results:
                journal.record(journal_entry(result))
                yield result
    finally:
        ray.shutdown()
        remove_partials(next(iter(outputs.values())).parent)


def remove_partials(output_dir: Path) -> None:
    """Partial masks a killed worker left behind: once every worker has stopped, none is being written."""
    for partial in Path(output_dir).glob(f"{io.PARTIAL_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)

