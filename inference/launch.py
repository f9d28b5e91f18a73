"""How the CLI starts (`python -m inference`, `flare-predict`): the first case's read is started before the
engine's imports (prefetch.py), then the CLI runs and the process leaves at once (cli.entry_point)."""
from __future__ import annotations

import sys

from . import prefetch


def run() -> None:
    prefetch.start(sys.argv[1:])
    from .cli import entry_point  # torch and the rest load while the first case is read

    entry_point()
