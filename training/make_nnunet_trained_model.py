"""A model folder written by nnU-Net v2's own planner, preprocessor and trainer, for tests that must not trust our
own model-folder writer (training/model_folder.py) to share nnU-Net's assumptions.

Runs in an environment with nnunetv2 (scripts/setup_nnunet_env.sh: .venv-nnunet):

    .venv-nnunet/bin/python training/make_nnunet_trained_model.py --work WORK [--cases 6] [--iterations 12]

writes WORK/nnUNet_raw/Dataset901_ParityBlobs (synthetic CT-like volumes with ellipsoid lesions, 1 x 1 x 3 mm:
the largest spacing on the last axis, so that nnU-Net's planner writes a non-identity `transpose_forward`),
plans and preprocesses it with nnU-Net's default ExperimentPlanner, trains fold 0 with nnU-Net's
`nnUNetTrainer` for one epoch of `--iterations` iterations on the CPU (the point is a folder in nnU-Net's exact
layout and format, not a good model; its name stays `nnUNetTrainer`, the class nnUNetPredictor finds without
importing trainer modules that need timm), and prints the model folder's path. Nothing of ours
writes into the model folder: the synthetic volumes are the only thing we make.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATASET_ID, DATASET_NAME = 901, "Dataset901_ParityBlobs"
SHAPE_ZYX, SPACING_ZYX = (44, 56, 24), (1.0, 1.0, 3.0)  # the last axis coarsest: transpose_forward [2, 0, 1]
TRAINER, PLANS, CONFIGURATION = "nnUNetTrainer", "nnUNetPlans", "3d_fullres"


def write_raw_dataset(raw: Path, cases: int, seed: int) -> Path:
    """nnU-Net's raw layout: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json."""
    sys.path.insert(0, str(REPO))
    from training.make_blob_model import write_blob_cases  # the volumes only: no model-folder code of ours

    folder = raw / DATASET_NAME
    write_blob_cases(folder / "imagesTr", folder / "labelsTr", cases, seed, SHAPE_ZYX, SPACING_ZYX)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": cases,
        "file_ending": ".nii.gz", "name": DATASET_NAME}, indent=1))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="nnUNet_raw, _preprocessed and _results go here")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=200, help="training iterations (one epoch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = args.work.resolve()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(work / name)
    os.environ.setdefault("nnUNet_n_proc_DA", "1")  # one augmentation worker (0 breaks the planner)
    os.environ.setdefault("nnUNet_compile", "false")
    write_raw_dataset(work / "nnUNet_raw", args.cases, args.seed)

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2.run.run_training import get_trainer_from_args

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(1,))
    # augmentation in this process (0 would have broken the planner above), every generator seeded: the same
    # model from the same script, as far as the CPU's arithmetic allows
    os.environ["nnUNet_n_proc_DA"] = "0"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, TRAINER, PLANS, device=torch.device("cpu"))
    trainer.num_epochs = 1  # nnU-Net's own trainer, briefly
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = 2
    trainer.run_training()
    model = work / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file(), model
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
