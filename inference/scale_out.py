"""Many cases on many workers, with Ray: `python -m inference -i IN -o OUT ... --ray [ADDRESS]`.

Workers are Ray actors, one per GPU (or one per `--ray-cpus` cores where there is no GPU), each loading the
model once and running the pipelined loop (batch.py) on the cases it is handed, a few at a time; the next cases
go to whichever worker is free. When a worker dies in the middle of a case (a killed process, a lost node), Ray
starts it again (max_restarts; on another node where its node died) and the cases it held are handed out again,
one a task, to the next free worker (task_results, not Ray's task retries); masks are written atomically, so
a case done twice is still one whole mask. With no ADDRESS Ray starts on this machine and stops with the run; with
one (`ray start --head` on one node, `ray start --address HEAD:6379` on the others, or a KubeRay RayCluster
on Kubernetes) the run joins that cluster, whose nodes must see IN, OUT and the model folder at the same
paths (a shared file system).

A journal, kept outside the output folder (`OUT.journal.jsonl` unless `--journal`), gets a line per case as
it finishes, with what made its mask (the run's fingerprint: the model folder's content, the settings that
change a mask, the engine; and the input's: provenance.py). A rerun skips a case the journal says is done only
where the same run made its mask from the same input and the mask still passes a fresh write's checks, so a
stopped batch resumes where it stopped, and a rerun with another model (`-m OTHER`), other settings or changed
inputs computes those cases again (a line says how many). Ray is imported here only: the plain CLI never loads
it (`pip install .[ray]`). An address where no cluster answers fails in seconds, one that answers and does
not start Ray within 30 s fails then.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from . import io, provenance
from .batch import CaseResult, predict_cases
from .errors import CaseError, ModelError
from .settings import PredictionSettings, RunOptions, read_environment

log = logging.getLogger("inference")
CASES_PER_TASK = 2  # pipelining within a worker, against retrying little when one dies


class Journal:
    """The cases a run finished (JSON lines: case file, mask, "ok" or the error, seconds, worker, and what made
    the mask: the run's fingerprint and the input's, provenance.py). Its folder is checked for writing when it
    is opened, before any work."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # said by the check below
        io.check_file_can_be_written(self.path, "the --ray journal (--journal)")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise CaseError(f"{self.path}: the --ray journal cannot be written")

    def finished(self) -> dict[str, dict]:
        """The last "ok" entry of each input path the journal records as done."""
        if not self.path.is_file():
            return {}
        done = {}
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short when the driver was killed
                continue
            if isinstance(entry, dict) and entry.get("status") == "ok" and isinstance(entry.get("input"), str):
                done[entry["input"]] = entry
        return done

    def record(self, entry: dict) -> None:
        with open(self.path, "a") as journal:
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())


def default_journal(output_dir: Path) -> Path:
    return Path(output_dir).resolve().parent / f"{Path(output_dir).resolve().name}.journal.jsonl"


def still_done(path: Path, output: Path, entry: dict | None, run: str | None) -> str | None:
    """Why a case the journal records as done must run again (None: it need not): another run fingerprint (a
    changed model folder, settings or engine), another input, or a mask that no longer passes a fresh write's
    checks (io.reusable_mask_problem)."""
    if entry is None:
        return "not done"
    try:
        note = provenance.mask_note(run, path)
    except OSError as err:
        return f"its input cannot be read ({err.strerror or err})"
    if run is None or entry.get("run") != run or note is None or entry.get("note") != note:
        return "done by another model, other settings or from another input"
    return io.reusable_mask_problem(path, output, note)


RAY_START_TIMEOUT_S = 30
TCP_TIMEOUT_S = 5


def check_reachable(address: str) -> None:
    """ModelError within TCP_TIMEOUT_S unless something answers at `address` (host:port, or ray://host:port):
    Ray itself retries an address where nothing listens for minutes, printing warnings."""
    target = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, separator, port = target.rpartition(":")
    if not separator or not port.isdigit():
        return  # "auto" and the like: Ray finds the cluster, bounded by RAY_START_TIMEOUT_S
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=TCP_TIMEOUT_S).close()
    except OSError as err:
        raise ModelError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err})") from None


def start_ray(address: str | None):
    """Ray on this machine (address None) or the cluster at `address`; quiet either way. Joining a cluster is
    bounded: ModelError after RAY_START_TIMEOUT_S (Ray waits for an unresponsive cluster for minutes). Ray's own
    SIGTERM handler (which exits with a C++ stack dump) is replaced by the one that was there."""
    import ray

    if ray.is_initialized():  # started already to learn the workers' device kind (cluster_device_kind)
        return ray
    options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    outcome: dict = {}

    def init():
        try:
            ray.init(**options)
            outcome["ok"] = True
        except Exception as err:  # ray.init raises ConnectionError, RuntimeError, ... by cause
            outcome["error"] = err

    handler = signal.getsignal(signal.SIGTERM)
    with ray_messages_to(open(os.devnull, "w")):  # Ray's C++ start-up warnings: our one line says it
        if address is None:
            # in this thread: Ray's own processes die with the thread that started them (PR_SET_PDEATHSIG)
            options.update(object_store_memory=200 * 2 ** 20)  # paths, not images, travel through Ray
            init()
        else:
            check_reachable(address)
            options.update(address=address)
            starter = threading.Thread(target=init, name="ray-start", daemon=True)
            starter.start()
            starter.join(RAY_START_TIMEOUT_S)
            if starter.is_alive():
                raise ModelError(f"--ray {address}: Ray did not start within {RAY_START_TIMEOUT_S} s (no Ray "
                                 "cluster answering at the address?)")
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)
    if "error" in outcome:
        hint = ("; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token and its token"
                if address is not None and read_environment().ray_auth_mode != "token" else "")
        raise ModelError(f"--ray {address or '(local)'}: Ray did not start "
                         f"({str(outcome['error']).strip().splitlines()[0]}){hint}")
    return ray


@contextmanager
def ray_messages_to(sink):
    """Whatever is written to the process's stderr (file descriptor 2) while Ray starts goes to `sink`: its
    C++ core prints multi-line warnings there, beside our one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.close()


def cluster_device_kind(address: str | None) -> str:
    """The kind of device `--device auto` workers compute on: "cuda" where the cluster has GPUs (each worker
    is then given one, worker_resources), else "cpu". The driver reads that kind's calibration record, not its
    own machine's. Ray is left running for predict_on_ray."""
    try:
        ray = start_ray(address)
    except ImportError:
        raise ModelError("--ray: Ray is not installed (pip install '.[ray]' or pip install ray)") from None
    return "cuda" if int(ray.cluster_resources().get("GPU", 0)) else "cpu"


def worker_resources(ray, cpus_per_worker: int) -> tuple[int, dict]:
    """How many workers, and what each asks of Ray: a GPU each where the cluster has GPUs, else
    `cpus_per_worker` cores each. ModelError where no node has that many cores (a worker would wait forever)."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    largest = max((int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                  default=0)
    if cpus_per_worker > largest:
        raise ModelError(f"--ray-cpus {cpus_per_worker}: no node of the cluster has that many cores (the largest "
                         f"has {largest}); a worker would never start")
    return max(1, int(total.get("CPU", 1)) // cpus_per_worker), {"num_cpus": cpus_per_worker}


class CaseWorker:
    """A Ray actor: the model, loaded once; `predict` runs the pipelined loop on the cases it is given. Each
    mask carries the fingerprint of the model this worker loaded; where that is not the driver's (a node that
    sees other files at the model folder's path), every case it is handed fails with one line."""

    def __init__(self, options: RunOptions, settings: PredictionSettings, run: str | None):
        import torch

        from .run_model import load_for_run

        torch.set_num_threads(read_environment().omp_num_threads or torch.get_num_threads())
        self.model = load_for_run(options, settings)
        self.settings = settings
        self.probabilities = options.save_probabilities
        # where the driver names no run (an API caller), the worker's masks carry no fingerprint either
        self.run = run and provenance.run_fingerprint(self.model.fingerprint(), settings, options.backend,
                                                      options.device, options.precision)
        self.expected = run

    def predict(self, cases: list[tuple[str, str]]) -> list[CaseResult]:
        paths = [Path(case) for case, _ in cases]
        outputs = {Path(case): Path(output) for case, output in cases}
        if self.run != self.expected:
            return [CaseResult(path, outputs[path], error=f"{path}: not run: the model folder seen by the worker on "
                               f"{socket.gethostname()} is not the driver's ({self.model.config.model_dir})",
                               worker=os.getpid()) for path in paths]
        return [replace(result, worker=os.getpid())
                for result in predict_cases(paths, outputs, self.model, self.settings, run=self.run,
                                            probabilities=self.probabilities)]


def journal_entry(result: CaseResult, run: str | None) -> dict:
    ok = result.error is None
    return {"input": str(result.path), "output": str(result.output), "worker": result.worker,
            "status": "ok" if ok else "failed", "error": result.error,
            "run": run, "note": written_note(result.output) if ok else None,
            "seconds": result.report.seconds.get("total") if result.report is not None else None, "at": time.time()}


def written_note(mask: Path) -> str | None:
    """The provenance note the worker wrote into the mask (taken from the input as it was read), None where the
    mask cannot be read: the journal then never counts the case as done."""
    try:
        return io.read_note(io.read_header(mask))
    except (CaseError, OSError):
        return None


def predict_on_ray(cases: list[Path], outputs: dict[Path, Path], options: RunOptions, settings: PredictionSettings,
                   journal: Journal, run: str | None = None) -> Iterator[CaseResult]:
    """Predict `cases` on Ray workers (options.ray_address: the cluster, "" for Ray on this machine; one worker per
    GPU or per options.ray_cpus cores, at most options.ray_workers), yielding each case's result as a worker finishes it (in no fixed
    order), once the journal has it. A case the journal records as done is kept (a result with `kept`) where the same run
    (`run`, provenance.run_fingerprint) made its mask from the same input and the mask passes a fresh write's
    checks; otherwise it runs again (a line says how many). Raises ModelError, at the first result asked for,
    when Ray is missing or does not start."""
    finished = journal.finished()
    todo, redone = [], 0
    for path in cases:
        reason = still_done(path, outputs[path], finished.get(str(path)), run)
        if reason is not None:
            todo.append(path)
            redone += str(path) in finished
        else:
            yield CaseResult(path, outputs[path], kept=True)
    if len(todo) < len(cases):
        log.info("journal %s: %d of %d case(s) already done, %d to go", journal.path, len(cases) - len(todo),
                 len(cases), len(todo))
    if redone:
        log.info("journal %s: %d case(s) it records as done run again: made by another model, other settings or "
                 "from other inputs, or their masks changed", journal.path, redone)
    if not todo:
        return
    try:
        ray = start_ray(options.ray_address or None)
    except ImportError:
        raise ModelError("--ray: Ray is not installed (pip install '.[ray]' or pip install ray)") from None
    try:
        count, resources = worker_resources(ray, options.ray_cpus)
        count = min(count, len(todo), options.ray_workers or count)
        # restarted when lost, on another node where its node died; its tasks handed out again by task_results
        worker_class = ray.remote(max_restarts=-1, max_task_retries=0, **resources)(CaseWorker)
        workers = [worker_class.remote(options, settings, run) for _ in range(count)]
        log.info("ray: %d worker(s), %s each; %d case(s)", count,
                 "one GPU" if "num_gpus" in resources else f"{resources['num_cpus']} core(s)", len(todo))
        tasks = [[(str(path), str(outputs[path])) for path in todo[start:start + CASES_PER_TASK]]
                 for start in range(0, len(todo), CASES_PER_TASK)]
        for results in task_results(ray, workers, tasks):
            for result in results:
                journal.record(journal_entry(result, run))
                yield result
    finally:
        ray.shutdown()
        remove_partials(next(iter(outputs.values())).parent)


MAX_ATTEMPTS = 3  # a task whose worker is lost (a killed process, a lost node) is handed out again, this often
WORKER_BACK_S = 120  # how long a lost worker may take to be started again (elsewhere, where its node died)
PROBE_EVERY_S = 0.5  # how often a lost worker is asked whether it is back


def error_line(err: BaseException) -> str:
    """The line of a Ray error that says what went wrong: the last `...Error: ...` line where Ray wraps a cause (a
    worker whose model did not load), else the first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"[\w.]*(Error|Exception): ", line)]
    return (causes or lines or [type(err).__name__])[-1 if causes else 0]


def task_results(ray, workers: list, tasks: list[list[tuple[str, str]]]) -> Iterator[list[CaseResult]]:
    """Each task's results, as a worker finishes it (in no fixed order): the tasks handed to whichever worker is
    free, one at a time. A task whose worker is lost goes to the next free worker, split into single cases (a case
    that kills its worker fails alone), MAX_ATTEMPTS times at most, after which its case fails with one line; the
    lost worker takes tasks again once Ray has started it again (on another node where its node died), or is given
    up after WORKER_BACK_S. The workers run with Ray's own task retries off: it would hold a task while its worker
    cannot be placed again, and does not cover a worker it reports unreachable (ActorUnavailableError: the task may
    or may not have run); a mask written twice is written atomically, the same."""
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

    lost = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)
    queue = [(task, 1) for task in reversed(tasks)]  # taken from the end
    idle, running = list(workers), {}
    lost_since: dict = {}  # lost worker -> when it was lost
    probe_at: dict = {}  # lost worker -> when to ask again whether it is back

    def computing() -> bool:  # a task under way (not only asking lost workers whether they are back)
        return any(task is not None for _, task, _ in running.values())

    while (queue and (idle or running or probe_at)) or computing():
        while queue and idle:
            worker = idle.pop()
            task, attempt = queue.pop()
            running[worker.predict.remote(task)] = (worker, task, attempt)
        now = time.monotonic()
        for future, (worker, task, _) in list(running.items()):
            if task is None and now - lost_since.get(worker, now) > WORKER_BACK_S:
                del running[future]  # its question never answered: given up (it cannot be placed again)
        for worker, at in list(probe_at.items()):
            if now - lost_since[worker] > WORKER_BACK_S:
                del probe_at[worker]  # given up: not back in time
            elif at <= now:
                del probe_at[worker]
                running[worker.__ray_ready__.remote()] = (worker, None, 0)
        if not running:
            if probe_at:
                time.sleep(PROBE_EVERY_S)
            continue
        ready, _ = ray.wait(list(running), num_returns=1, timeout=PROBE_EVERY_S if lost_since else None)
        if not ready:
            continue
        worker, task, attempt = running.pop(ready[0])
        try:
            results = ray.get(ready[0])
        except lost as err:
            if task is not None:  # its cases go to the next free worker, one a task
                for case in task:
                    if attempt < MAX_ATTEMPTS:
                        queue.append(([case], attempt + 1))
                    else:
                        yield [CaseResult(Path(case[0]), Path(case[1]), error=f"{case[0]}: its worker was lost "
                                                                               f"{attempt} times ({error_line(err)})")]
            lost_since.setdefault(worker, time.monotonic())
            probe_at[worker] = time.monotonic() + PROBE_EVERY_S
            continue
        except Exception as err:  # raised in the worker's own code (RayTaskError): its cases fail, the run goes on
            results = [CaseResult(Path(case), Path(output), error=f"{case}: {error_line(err)}")
                       for case, output in task] if task is not None else None
        lost_since.pop(worker, None)
        idle.append(worker)
        if task is not None:
            yield results
    for task, attempt in queue:  # every worker lost for good
        yield [CaseResult(Path(case), Path(output), error=f"{case}: not run: every Ray worker was lost")
               for case, output in task]


def remove_partials(output_dir: Path) -> None:
    """Partial masks a killed worker left behind: once every worker has stopped, none is being written."""
    for partial in Path(output_dir).glob(f"{io.PARTIAL_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)

