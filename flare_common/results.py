"""Where benchmark results go, and how their files name paths."""
from __future__ import annotations

import os
from pathlib import Path

from .files import write_json_atomically, write_text_atomically
from .machine import device_tag

REPO = Path(__file__).resolve().parent.parent
# Committed results; EVAL_DEFAULT_RESULTS sends a run elsewhere (a scratch folder for a diagnostic).
RESULTS = Path(os.environ.get("EVAL_DEFAULT_RESULTS", REPO / "results"))
# Results of finished experiments, kept with their scripts (experiments/README.md is the index).
EXPERIMENT_RESULTS = REPO / "experiments" / "results"


def display(path) -> str:
    """A path relative to the repository when inside it (results are committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_result(name: str, result: dict, markdown: str, folder: Path = RESULTS) -> Path:
    """`folder`/<name>_<device>_<date>.json and .md, the device being result["machine"]'s GPU, else its CPU
    (device_facts); returns the path without suffix."""
    machine = result["machine"]
    stem = Path(folder) / f"{name}_{device_tag(machine.get('gpu') or machine['cpu'])}_{machine['date'][:10]}"
    write_json_atomically(stem.with_suffix(".json"), result)
    write_text_atomically(stem.with_suffix(".md"), markdown)
    return stem
