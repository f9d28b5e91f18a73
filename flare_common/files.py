"""Files written so that no reader ever sees a partial one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Hidden, and not ending in the target's suffix: a reader listing `*.nii.gz` or `*.csv` never sees it.
TEMPORARY_PREFIX = ".partial-"


@contextmanager
def atomic_path(path: str | Path, prefix: str = TEMPORARY_PREFIX) -> Iterator[Path]:
    """A path to write `path`'s content to: `<folder>/<prefix>XXXX/<name>`, in a hidden folder beside the
    target, so that writers that choose their format by the suffix (ITK, matplotlib) see the real name.
    Renamed to `path` when the block ends without an error; the hidden folder is removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    try:
        written = folder / path.name
        yield written
        os.replace(written, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_path(path) as written:
        written.write_text(text)


def write_json_atomically(path: str | Path, data, indent: int = 1) -> None:
    """JSON without NaN (as `null` is what readers of other languages understand), written atomically."""
    write_text_atomically(path, json.dumps(data, indent=indent, allow_nan=False))
