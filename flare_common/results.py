"""Where benchmark results go, and how their files name paths."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Committed results; EVAL_DEFAULT_RESULTS sends a run elsewhere (a scratch folder for a diagnostic).
RESULTS = Path(os.environ.get("EVAL_DEFAULT_RESULTS", REPO / "results"))
# Results of finished experiments, kept with their scripts (experiments/README.md is the index).
EXPERIMENT_RESULTS = REPO / "experiments" / "results"


def display(path) -> str:
    """A path relative to the repository when inside it (results are committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
