"""The first case's image, read in a thread while the rest of the engine (torch above all) is imported.

SimpleITK releases the GIL while it reads and decompresses, so the read runs on another core beside the
imports: on the 2-core CPU a 512x512x554 .nii.gz took 0.68 s to read alone and as long beside a busy Python
thread. Only what a later `take` asks for is used; a read that failed raises there, exactly as a read in
place would. Imports nothing of torch.
"""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

import SimpleITK as sitk

from . import io, provenance
from .dicom_series import DicomSeries

_pending: dict[Path, tuple[threading.Thread, dict]] = {}


def start(argv: list[str]) -> None:
    """Start reading the first case of the input folder named by `-i/--input` in `argv` (if any)."""
    # ITK's own multi-line warnings are off in the CLI (io.py says what matters in one line), from the start
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--input")
    parser.add_argument("-o", "--output")
    parser.add_argument("--ray", nargs="?", const="")
    known, _ = parser.parse_known_args(argv)
    if known.ray is not None or not known.input:
        return  # Ray's workers read the cases, not this process
    try:
        scan = io.find_cases(known.input)
        if known.output:
            io.set_aside_earlier_masks(scan, known.output)  # not an earlier run's mask (input = output folder)
        cases = scan.cases
    except Exception:  # whatever it is, the CLI meets it again in its place and says it in one line
        return
    if cases:
        path = cases[0]
        result: dict = {}
        thread = threading.Thread(target=_read, args=(path, result), name="prefetch", daemon=True)
        thread.start()
        _pending[path] = (thread, result)


def _read(path: Path, result: dict) -> None:
    try:
        result["read"] = read_with_fingerprint(path)
    except Exception as error:  # raised again by `take`, where the read would have been
        result["error"] = error


def read_with_fingerprint(path: Path) -> tuple[sitk.Image, str]:
    """The case's image and its input fingerprint (provenance.input_fingerprint), taken before the read: a file
    replaced while it is read or computed is never named by its new content in the mask's note."""
    try:
        fingerprint = provenance.input_fingerprint(path)
    except OSError as err:
        raise io.CaseError(f"{path}: cannot read image ({err.strerror or err})") from None
    return io.read_image(path), fingerprint


def take(path: Path) -> tuple[sitk.Image, str] | None:
    """The prefetched image of `path` and its input fingerprint (waiting for the read to end), None when it was
    not prefetched."""
    pending = _pending.pop(path if isinstance(path, DicomSeries) else Path(path), None)
    if pending is None:
        return None
    thread, result = pending
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["read"]
