"""The model folder nnU-Net's own planner, preprocessor and trainer write (make_nnunet_trained_model.py, run in
.venv-nnunet), trained once and kept in the user's cache, keyed by what makes it: the training script, the data's
generator, nnU-Net's pinned version and the iterations. Shared by the parity and calibration tests and benchmarks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from flare_common.digests import cache_root

REPO = Path(__file__).resolve().parent.parent
NNUNET_PYTHON = REPO / ".venv-nnunet" / "bin" / "python"
TRAINER_SCRIPT = REPO / "training" / "make_nnunet_trained_model.py"
ITERATIONS = 200  # enough for lesions in the masks: with 12, nnU-Net's model still predicts background only
MADE_BY = [TRAINER_SCRIPT, REPO / "training" / "make_blob_model.py", REPO / "scripts" / "setup_nnunet_env.sh"]


def nnunet_trained_model(scratch_root: Path | None = None, iterations: int = ITERATIONS, timeout: int = 1200) -> Path:
    """The model folder (nnUNet_results/Dataset901_ParityBlobs/nnUNetTrainer__nnUNetPlans__3d_fullres), trained where
    the cache holds none (about 4 minutes on 2 cores). `scratch_root`: where to keep it when there is no cache
    (FLARE_CACHE_DIR=off). RuntimeError with the trainer's last output where training fails; FileNotFoundError where
    .venv-nnunet is missing."""
    if not NNUNET_PYTHON.exists():
        raise FileNotFoundError(f"{NNUNET_PYTHON} not found: run scripts/setup_nnunet_env.sh")
    key = hashlib.sha256(b"".join(path.read_bytes() for path in MADE_BY) + f"{iterations}".encode()).hexdigest()[:16]
    root = cache_root() or scratch_root or Path(tempfile.mkdtemp(prefix="nnunet-"))
    work = Path(root) / "nnunet-trained" / key
    model = work / "nnUNet_results" / "Dataset901_ParityBlobs" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if (model / "fold_0" / "checkpoint_final.pth").is_file():
        return model
    work.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=work.parent))  # renamed into place when whole
    done = subprocess.run([str(NNUNET_PYTHON), str(TRAINER_SCRIPT), "--work", str(scratch), "--iterations",
                           str(iterations)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RuntimeError(f"{TRAINER_SCRIPT} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    try:
        scratch.rename(work)
    except OSError:  # another run put its model there first: the same one
        shutil.rmtree(scratch, ignore_errors=True)
    return model


# twice the training volumes' extent along each axis at their spacing (make_nnunet_trained_model.SHAPE_ZYX, 1 x 1 x 3
# mm), so that the patches calibration tries (1.0 / 1.2 / 1.5 x the training patch) each tile them differently
VALIDATION_SHAPE_ZYX, VALIDATION_SPACING_ZYX = (88, 112, 40), (1.0, 1.0, 3.0)


def write_validation_cases(folder: Path, cases: int, seed: int) -> None:
    """`cases` volumes of the training data's generator (make_blob_model.synthesize_case) from a seed the model never
    saw: folder/images/<case>_0000.nii.gz and folder/labels/<case>.nii.gz."""
    from training.make_blob_model import write_blob_cases

    write_blob_cases(folder / "images", folder / "labels", cases, seed, VALIDATION_SHAPE_ZYX, VALIDATION_SPACING_ZYX)
