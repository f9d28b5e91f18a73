"""What a model folder's network and masks are made of, as content hashes: an ONNX export, a cached export, a
journal entry or a mask written by an earlier run is used only where its fingerprint is the current one. Each file's
SHA-256 comes from flare_common/digests.py (remembered by file identity: 0.52 s for a 781 MB checkpoint hashed,
0.001 s remembered, results/fingerprint_*.md).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from flare_common.digests import file_digest


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
