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
        # a name that is not UTF-8 (legal on Linux) is written under a plain one: SimpleITK cannot take it
        written = folder / (path.name if is_utf8(path.name) else "file" + image_suffix(path.name))
        yield written
        os.replace(written, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def is_utf8(text: str) -> bool:
    """Whether a path (as Python decodes file names, undecodable bytes as surrogates) is valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def image_suffix(name: str) -> str:
    """`.nii.gz` for a gzipped NIfTI, else the last suffix (what ITK chooses its reader and writer by)."""
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix
    return suffix if is_utf8(suffix) else ""


@contextmanager
def itk_path(path: str | Path) -> Iterator[str]:
    """`path` as a string SimpleITK can take.

    SimpleITK aborts the whole process (SIGABRT, from a C++ exception) on a path that is not valid UTF-8, legal
    on Linux (a latin-1 `caf\xe9_0000.nii.gz`). Such a path is reached through a symbolic link of a plain name
    in a temporary folder, with the same suffix: to the file (to read it), or to its folder where the file's own
    name is plain (to write it)."""
    text = os.fspath(path)
    if is_utf8(text):
        yield text
        return
    path = Path(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix="flare-path-") as folder:
        if is_utf8(path.name) and not path.exists():
            (Path(folder) / "folder").symlink_to(path.parent)
            yield str(Path(folder) / "folder" / path.name)
        else:
            link = Path(folder) / ("file" + image_suffix(path.name))
            link.symlink_to(path)
            yield str(link)


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_path(path) as written:
        written.write_text(text)


def write_json_atomically(path: str | Path, data, indent: int = 1) -> None:
    """JSON without NaN (as `null` is what readers of other languages understand), written atomically."""
    write_text_atomically(path, json.dumps(data, indent=indent, allow_nan=False))
