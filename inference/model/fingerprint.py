"""What a model folder's network and masks are made of, as content hashes: an ONNX export, a cached export, a
journal entry or a mask written by an earlier run is used only where its fingerprint is the current one.

A size and a modification time do not say that a file is unchanged: `cp -p`, tar and reproducible image builds
give another checkpoint the same ones. The fingerprints hash the content (SHA-256). Hashing a checkpoint costs
about 0.8 s a GB on the 2-core AVX-512 CPU (0.63 s for 800 MB from the page cache), so each file's digest is
remembered in the user's cache under the file's identity (device, inode, size, modification and change times):
replacing a file or writing into it gives it a new change time (ctime), which no user can set back. A digest
is remembered only for a file whose change time is over a second old (git's "racy" rule: a file changed again
within the clock's tick would keep its ctime). Where the cache cannot be written (a read-only container) the
file is hashed every time.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from flare_common.files import write_text_atomically

CACHE_ENV = "FLARE_CACHE_DIR"
RACY_S = 1.0
_hashing = threading.Lock()  # one file hashed at a time: a second caller for the same file finds it remembered
_remembered: dict[tuple, str] = {}  # this process's digests, by path and identity


def cache_root() -> Path | None:
    """$FLARE_CACHE_DIR, else $XDG_CACHE_HOME/flare-inference, else ~/.cache/flare-inference; None where
    FLARE_CACHE_DIR=off (the submission image: every run is a fresh container, and nothing may be written
    inside it)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit == "off":
        return None
    if explicit:
        return Path(explicit)
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry: a container run as an arbitrary user id
        return Path(tempfile.gettempdir()) / f"flare-inference-{os.getuid()}"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "flare-inference"


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), remembered under the file's identity (see module doc)."""
    path = Path(path).resolve()
    with _hashing:
        key = (os.fsencode(path), *_identity(path.stat()))
        if key not in _remembered:
            _remembered[key] = _file_digest(path)
        return _remembered[key]


def _file_digest(path: Path) -> str:
    before = path.stat()
    root = cache_root()
    memo = root / "digests" / (hashlib.sha1(os.fsencode(path)).hexdigest() + ".json") if root else None
    try:
        remembered = json.loads(memo.read_text()) if memo else {}
        if remembered.get("identity") == _identity(before):
            return remembered["sha256"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    after = path.stat()
    if memo and _identity(after) == _identity(before) and time.time() - after.st_ctime_ns / 1e9 > RACY_S:
        try:
            write_text_atomically(memo, json.dumps({"path": os.fsdecode(path), "identity": _identity(after),
                                                    "sha256": digest}))
        except OSError:
            pass  # no cache here: hashed again next time
    return digest


def _combine(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def network_fingerprint(model_dir: Path, configuration: str, fold: str, checkpoint: Path | None) -> str:
    """The content that defines one fold's network: plans.json, dataset.json, the configuration, the fold and
    its checkpoint (None: the plans alone, for a folder shipped with exports only)."""
    parts = [file_digest(model_dir / "plans.json"), file_digest(model_dir / "dataset.json"), configuration, fold]
    return _combine(parts + ([file_digest(checkpoint)] if checkpoint is not None else ["no checkpoint"]))


def model_fingerprint(model_dir: Path, configuration: str, fold_files: Sequence[tuple[str, Path]]) -> str:
    """The content that defines a model's masks: each fold's network (`fold_files`: the fold and the file its
    weights come from, a checkpoint or an export) and the lesion filter the folder ships."""
    parts = [file_digest(model_dir / "plans.json"), file_digest(model_dir / "dataset.json"), configuration]
    parts += [f"{fold}:{file_digest(path)}" for fold, path in fold_files]
    lesion_filter = model_dir / "lesion_filter.json"
    parts.append(file_digest(lesion_filter) if lesion_filter.is_file() else "no lesion filter")
    return _combine(parts)
