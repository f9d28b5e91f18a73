"""Content hashes of files (SHA-256), remembered by each file's identity: what the engine's fingerprints of a
model folder (inference/model/fingerprint.py) and of an input (inference/provenance.py) are made of.

A size and a modification time do not say that a file is unchanged: `cp -p`, tar and reproducible image builds
give another checkpoint the same ones. The digests hash the content. Hashing costs 0.52 s for a 781 MB
checkpoint on the 2-core AVX-512 CPU, from the page cache (results/fingerprint_*.md), so each file's digest is
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

from .files import write_text_atomically

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
        return private_temp_folder()
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "flare-inference"


def private_temp_folder() -> Path | None:
    """A cache folder in the shared temporary folder that only this user can write (made 0700), None where one of
    that name belongs to another user or is open to others: a digest or an export planted there would be used."""
    folder = Path(tempfile.gettempdir()) / f"flare-inference-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        stat = folder.lstat()
    except OSError:
        return None
    if not folder.is_dir() or folder.is_symlink() or stat.st_uid != os.getuid() or stat.st_mode & 0o022:
        return None
    return folder


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
