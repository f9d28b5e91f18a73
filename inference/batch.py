"""Many cases with one loaded model, pipelined: the next case is read while this one is computed, and this
one's mask is written while the next is computed. SimpleITK releases the GIL while it reads, decompresses,
compresses and writes, and torch and ONNX Runtime while they compute, so the three overlap on separate cores.

Memory stays bounded: one case read ahead, one being computed, one mask being written (three images at the
most: about 3 x 290 MB of int16 CT for 512x512x554 cases, plus the computation's own). Results come back in
the cases' order, each case's failure its own; the masks are the ones a case-by-case run writes, voxel for
voxel (the same functions on the same data, only at other times).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import SimpleITK as sitk

from . import io, prefetch, provenance
from .dicom_seg import SEG_SUFFIX
from .dicom_series import DicomSeries
from .errors import CaseError, ModelError
from .pipeline import predict_image_with_probability, predict_image_with_report
from .settings import PredictionSettings
from .timing import CaseReport, StageTimer

# the public names; the rest is internal (docs/ARCHITECTURE.md)
__all__ = ["CaseResult", "predict_cases"]

log = logging.getLogger("inference")


@dataclass
class CaseResult:
    """One case's outcome: its report, or the one-line error that stopped it."""

    path: Path
    output: Path
    report: CaseReport | None = None
    error: str | None = None
    worker: int | None = None  # the process that computed it, where that is not this one (Ray)
    kept: bool = False  # not computed: an earlier run's mask, which the run's journal records, is kept


def error_line(path: Path, err: Exception) -> str:
    """One line naming the case's file: the message itself when it already does."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not isinstance(err, (CaseError, ModelError, ValueError)):
        message = f"{type(err).__name__}: {message}"
    return message if message.startswith(str(path)) else f"{path}: {message}"


def read_case(path: Path) -> tuple[sitk.Image, str]:
    """The case's image and input fingerprint: those taken while the engine was imported (prefetch.py), else now
    (prefetch.read_with_fingerprint)."""
    return prefetch.take(path) or prefetch.read_with_fingerprint(path)


PROBABILITY_FOLDER = "probabilities"  # under the output folder: a scorer listing <output>/*.nii.gz never sees them


def probability_path(output: Path) -> Path:
    """Where the lesion probability of the mask at `output` is written (--save-probabilities)."""
    return output.parent / PROBABILITY_FOLDER / output.name


def write_case(mask: sitk.Image, output: Path, report: CaseReport, started: float, note: str | None = None,
               case: io.Case | None = None, model_name: str = "", probability: sitk.Image | None = None
               ) -> CaseReport:
    """Write the mask to `output`, with `note`, what made it (provenance.mask_note); as a DICOM SEG of the case's
    series where `output` is a SEG's (dicom_seg.SEG_SUFFIX, --output-format dicom-seg). The lesion probability, where
    given, first (probability_path), with the mask's note: a mask is never there without the probability asked for
    beside it, made by the same run from the same input. Without one, an earlier run's probability at that path is
    removed: it would belong to another mask."""
    seg = output.name.endswith(SEG_SUFFIX) and isinstance(case, DicomSeries)
    with StageTimer(report)("write"):  # host-side: nothing to synchronise
        if probability is not None and seg:
            io.write_seg_atomically(probability, case, probability_path(output), model_name, probability=True)
        elif probability is not None:
            io.write_image_atomically(probability, probability_path(output), note)
        else:
            probability_path(output).unlink(missing_ok=True)
        if seg:
            io.write_seg_atomically(mask, case, output, model_name)
        else:
            io.write_image_atomically(mask, output, note)
    report.seconds["total"] = time.perf_counter() - started
    return report


def completed(function, *args) -> Future:
    """`function(*args)` run now, as a finished Future: its result, or the exception raised again where the
    result is waited for (the sequential loop goes through the pipelined loop's code)."""
    done: Future = Future()
    try:
        done.set_result(function(*args))
    except Exception as err:
        done.set_exception(err)
    return done


def compute_case(image_future: Future, model, settings: PredictionSettings, started: float, progress: bool = False,
                 probability: bool = False) -> tuple[sitk.Image, sitk.Image | None, CaseReport, str]:
    """Wait for the case's image (the wait is its "read" stage), then predict its mask: the mask, the lesion
    probability (with `probability`, else None), the case's report and the input's fingerprint. The time budget
    counts from `started`, the read included."""
    report = CaseReport()
    with StageTimer(report)("read"):
        image, fingerprint = image_future.result()
    if probability:
        return *predict_image_with_probability(image, model, settings, report, started, progress), fingerprint
    mask, report = predict_image_with_report(image, model, settings, report, started, progress)
    return mask, None, report, fingerprint


def predict_cases(cases: Sequence[io.Case], outputs: dict[io.Case, Path], model, settings: PredictionSettings,
                  pipelined: bool = True, run: str | None = None, progress: bool = False,
                  probabilities: bool = False) -> Iterator[CaseResult]:
    """Predict and write every case, yielding each result in order once its mask is written (or it failed).
    `pipelined=False`: one case after another (read, compute, write), for comparison. `run`: the run's
    fingerprint (provenance.run_fingerprint), written into each mask with its input's. `progress`: a bar over
    each case's windows."""
    reader = started_pool("read") if pipelined else None
    writer = started_pool("write") if pipelined else None
    reads: deque[Future] = deque()

    def read_ahead(index: int) -> None:
        if reader is not None and index < len(cases):
            reads.append(reader.submit(read_case, cases[index]))

    def image_of(path: Path) -> Future:
        return reads.popleft() if reader is not None else completed(read_case, path)

    writing: tuple[Path, Future] | None = None  # the previous case's mask, being written

    def finish_writing() -> CaseResult | None:
        nonlocal writing
        if writing is None:
            return None
        path, future = writing
        writing = None
        try:
            return CaseResult(path, outputs[path], report=future.result())
        except Exception as err:
            return CaseResult(path, outputs[path], error=error_line(path, err))

    try:
        read_ahead(0)
        for index, path in enumerate(cases):
            read_ahead(index + 1)  # the next case is read while this one is computed
            started = time.perf_counter()
            try:
                mask, probability, report, fingerprint = compute_case(image_of(path), model, settings, started,
                                                                      progress, probabilities)
            except Exception as err:  # one broken case must not stop the others
                if (previous := finish_writing()) is not None:
                    yield previous
                yield CaseResult(path, outputs[path], error=error_line(path, err))
                continue
            if (previous := finish_writing()) is not None:  # one mask in flight at a time
                yield previous
            submit = writer.submit if writer is not None else completed
            note = provenance.mask_note(run, source_fingerprint=fingerprint)
            writing = (path, submit(write_case, mask, outputs[path], report, started, note, path,
                                    model.config.model_dir.name, probability))
            del mask, probability
        if (previous := finish_writing()) is not None:
            yield previous
    finally:  # stopped (SIGTERM) or done: a write under way ends (its mask whole), nothing new starts
        stopped = wait_for_pools([pool for pool in (reader, writer) if pool is not None])
        if writing is not None and writing[1].done() and writing[1].exception() is None:
            # stopped while this mask was being written: it is whole, and the log says it is there
            log.info("%s: written (it was being written when the run was stopped)", io.case_id(writing[0]))
        if stopped is not None:
            raise stopped


def started_pool(name: str) -> ThreadPoolExecutor:
    """A one-thread pool whose thread already runs. A pool starts its thread inside the first submit, and a
    SIGTERM raised there, between the thread's start and the pool's note of it, left a pool whose shutdown did not
    wait for that thread: the process left while it wrote the first mask, and the partial file stayed (seen in
    the corpus' sigterm-while-writing, 3 runs in 6)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    pool.submit(int).result()
    return pool


def wait_for_pools(pools: list[ThreadPoolExecutor]) -> KeyboardInterrupt | None:
    """Shut the pools down, their running work ended and nothing new started, even where SIGTERM (raised here as a
    KeyboardInterrupt) arrives while they are waited for: a mask half written when the process leaves would stay
    as a partial file. Returns that interruption, for the caller to raise once the pools are done."""
    stopped = None
    for pool in pools:
        while True:
            try:
                pool.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt as stop:
                stopped = stop
    return stopped
