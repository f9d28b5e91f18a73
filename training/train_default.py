"""Train the embedded default model (models/default) on synthetic phantoms, on the CPU, in a time budget.

    python training/train_default.py --out models/default [--minutes 58] [--seed 1000] [--cases 120] \
        [--bf16 --no-compile --light-decoder]

What it does, in order:
  1. generates `--cases` phantoms with `phantoms.generate_phantom(seed, i)` (a TRAINING seed;
     evaluation uses other seeds), body-crops each with the engine's own crop (`inference.pipeline.crop_box`)
     and keeps the cropped raw HU volume in a temporary folder;
  2. computes the CTNormalization intensity properties from the foreground voxels of all of them
     (see FOREGROUND below) and writes the model folder (plans.json, dataset.json, an untrained
     checkpoint) with `training.model_folder`;
  3. loads that folder with `inference.model.load_model` and brings every case to model space with the
     engine's `inference.pipeline.to_model_space` (normalise, then torch trilinear resampling), so that
     training sees exactly the inputs inference will; labels are resampled trilinearly and thresholded at
     0.5 (nnU-Net's order-1 label resampling, for one label); cached as float16 / uint8 numpy arrays;
  4. trains the network that `inference.model.network.build_network(read_model_config(out))` builds
     (deep supervision switched on for training only; the state dict is the same), on random patches,
     FOREGROUND_FRACTION of them centred near a lesion voxel and HARD_NEGATIVE_FRACTION on normal tissue
     that looks like a lesion (from the phantoms' tissue map), random flips on all axes and a mild
     intensity jitter, Dice + cross-entropy loss, AdamW with a poly learning-rate decay over the time
     budget (or over --steps), batch size 4 (--batch-size), torch.set_num_threads(--threads); with --bf16
     the forward pass runs under bf16 autocast (on a CPU worth it only with bf16 instructions, e.g.
     AVX512_BF16);
  5. writes fold_all/checkpoint_final.pth at the end, and fold_all/checkpoint_latest.pth every
     --save-every minutes (so a crash loses little; --resume continues from it).

A larger model on a GPU (training/gpu_train.sh runs it on a lent device): --device cuda --patch 64 64 64
--base-features 16 --batch-size 8 --workers 16 (phantoms generated in 16 processes; the same files as one).

Reproducibility: numpy and torch are seeded from --seed, phantoms from --seed; the patch sequence and the
weights after N steps are the same on the same torch build. With the default time budget the number of
steps depends on the machine's speed; pass --steps to fix it (the learning-rate schedule then runs over
steps instead of time).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

# Set before torch starts OpenMP: on a shared 2-core machine, spinning worker threads waste the time
# slices other processes need and slow every step down several times (measured: 9 s -> 4.7 s a step).
import cc3d
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tqdm import tqdm
from phantoms import BOWEL, CSF, GENERATOR_VERSION, MUSCLE, NODE, ORGAN, VESSEL, generate_phantom
from flare_common.machine import cpu_model
from flare_common.results import display
from inference import ModelError, PredictionSettings
from inference.model import build_network, load_checkpoint, load_model, model_fingerprint, read_model_config
from inference.pipeline import crop_box, to_model_space
from inference.resample import resample_channels
from training.model_folder import (make_dataset_json, make_plans, plain_unet_arch_kwargs,
                                    write_model_folder)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


REPO = Path(__file__).resolve().parent.parent


# ---- the model --------------------------------------------------------------------------------------
SPACING = (3.0, 3.0, 3.0)        # (z, y, x) mm: coarse, so that a whole-body CT runs on a CPU
PATCH_SIZE = (32, 32, 32)        # 9.6 cm at 3 mm (the engine infers with 48^3, 14.4 cm); small patches
                                 # let a CPU take ~4x more steps in the same time, which is what made
                                 # training leave the all-background minimum (64^3: Dice 0 after 683 steps)
N_STAGES = 5                     # total stride 16
BASE_FEATURES = 8                # 8-16-32-64-128 features, 1.4 M parameters
MAX_FEATURES = 320
# --light-decoder: one conv in the full-resolution encoder stage and in every decoder stage (nnU-Net's
# residual-encoder presets use one conv per decoder stage too). The full-resolution stage is 60% of a CPU
# step (experiments/results/training_step_profile.md); with this network (1.26 M parameters) the 58 min run took
# 37,795 steps instead of 25,469 (models/README.md). models/default is trained with it.
LIGHT_ENCODER_CONVS = [1] + [2] * (N_STAGES - 1)
LIGHT_DECODER_CONVS = [1] * (N_STAGES - 1)
# ---- the data ---------------------------------------------------------------------------------------
# FOREGROUND for the intensity properties: the body voxels (HU above the engine's body-crop threshold,
# inside the crop box), not the lesion voxels nnU-Net would use (foreground = any label > 0). With a
# lesion-only label set nnU-Net's choice clips at the lesions' HU range (~10..1100 HU here): fat, lung
# and air would all become one value, and lung nodules and lymph nodes in fat would lose most of their
# contrast. Clipping at the body's 0.5 / 99.5 percentiles (about fat .. cortical bone) keeps it.
BODY_THRESHOLD_HU = -500.0
FOREGROUND_SAMPLES_PER_CASE = 10_000  # nnU-Net samples 10k foreground voxels per case, too
FOREGROUND_FRACTION = 0.5             # share of patches centred near a lesion voxel
# Of those, this share is centred on a random lesion first (small lesions seen as often as large ones),
# the rest on a random lesion voxel of the case (large lesions: their strong gradient is what gets
# training started; lesion-uniform sampling alone stayed at Dice 0 for 300 steps, voxel-uniform reached
# a training-batch Dice of 0.5 in 800).
LESION_UNIFORM_SHARE = 0.5
# Share of patches centred on normal tissue that looks like a lesion. The model trained with lesion and
# random patches only marked fluid-filled bowel loops (lymph-node look-alikes), the thyroid and
# oesophagus in the neck as lesions in every healthy phantom (51 ml a case): random patches rarely land
# there. The phantoms' tissue map says where these tissues are; a class is drawn first, then a voxel,
# so that small ones (the spinal canal inside a vertebra, a lytic-lesion look-alike) are seen too. Normal
# lymph nodes (generator version 2: small, with a fatty hilum, in the same stations as enlarged ones) are one.
HARD_NEGATIVE_FRACTION = 0.25
HARD_NEGATIVE_TISSUES = (BOWEL, ORGAN, VESSEL, MUSCLE, CSF, NODE)
HARD_NEGATIVES_PER_TISSUE = 2000      # voxels kept per tissue class and case
# ---- the optimisation -------------------------------------------------------------------------------
BATCH_SIZE = 4
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 3e-5
WARMUP_STEPS = 30
DEEP_SUPERVISION_LEVELS = 3           # full, 1/2 and 1/4 resolution outputs, weights 4:2:1 (normalised)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "models" / "default"), help="model folder to write")
    parser.add_argument("--minutes", type=float, default=58.0,
                        help="wall-clock budget of the whole run (data generation included)")
    parser.add_argument("--seed", type=int, default=1000, help="training seed (phantoms and torch)")
    parser.add_argument("--cases", type=int, default=120, help="number of training phantoms")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps (schedule over steps, not time)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    parser.add_argument("--work-dir", default=None,
                        help="cache folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="train the eager network (the committed model: --bf16 --no-compile "
                             "--light-decoder). Compiling the fp32 network was no faster over a whole 58 min run "
                             "(0.466 s/step against 0.454 eager, an older CPU); it costs ~80 s once, tests skip it")
    parser.add_argument("--bf16", action="store_true",
                        help="run the forward pass under bf16 autocast (weights, optimiser and loss stay fp32): "
                             "1.44x the fp32 step rate on an AVX-512 CPU with bf16 instructions "
                             "(experiments/results/training_step_bf16.md), so more steps in the same time budget")
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE,
                        help=f"AdamW's peak learning rate, before warm-up and poly decay ({LEARNING_RATE:g})")
    parser.add_argument("--light-decoder", action="store_true",
                        help="one conv in the full-resolution encoder stage and in each decoder stage "
                             "instead of two: ~1.4x the step rate, 1.26 M parameters instead of 1.41 M "
                             "(models/default is trained with it)")
    parser.add_argument("--init-from", metavar="MODEL_FOLDER", default=None,
                        help="fine-tune: start from this model folder's fold_all/checkpoint_final.pth and keep its "
                             "intensity normalisation (so its weights see the inputs they were trained on), with a "
                             "fresh learning-rate schedule on the phantoms of --seed; the architecture flags must "
                             "build its network")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/fold_all/checkpoint_latest.pth (same --work-dir)")
    larger = parser.add_argument_group("a larger model (the GPU path: training/gpu_train.sh)")
    larger.add_argument("--device", default="cpu",
                        help="torch device to train on (cpu, cuda, cuda:1); on CUDA --bf16 autocasts there")
    larger.add_argument("--patch", type=int, nargs=3, default=list(PATCH_SIZE), metavar=("Z", "Y", "X"),
                        help=f"training patch in voxels at 3 mm (default {' '.join(map(str, PATCH_SIZE))}); "
                             "the engine infers with this times its patch scale")
    larger.add_argument("--base-features", type=int, default=BASE_FEATURES,
                        help=f"features of the first stage, doubled per stage up to {MAX_FEATURES} "
                             f"(default {BASE_FEATURES})")
    larger.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"patches a step (default {BATCH_SIZE})")
    larger.add_argument("--workers", type=int, default=1,
                        help="processes generating the phantoms (the same phantoms and hard negatives as one)")
    args = parser.parse_args(argv)
    if min(args.patch) < 2 ** (N_STAGES - 1) or any(p % 2 ** (N_STAGES - 1) for p in args.patch):
        parser.error(f"--patch: each side a multiple of {2 ** (N_STAGES - 1)} (the network's total stride)")
    if args.base_features < 1 or args.batch_size < 1 or args.workers < 1:
        parser.error("--base-features, --batch-size and --workers must be positive")
    if args.init_from:
        if not (Path(args.init_from) / "fold_all" / "checkpoint_final.pth").is_file():
            parser.error(f"--init-from {args.init_from}: no fold_all/checkpoint_final.pth there")
        if Path(args.init_from).resolve() == Path(args.out).resolve():
            parser.error("--init-from: a folder other than --out (the run rewrites --out as it trains)")
        try:
            read_model_config(args.init_from)
        except ModelError as error:
            parser.error(f"--init-from: {error}")
    return args


# ---- 1./2. phantoms, crop, intensity properties ----------------------------------------------------------

def training_geometry(seed: int, index: int) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and spacing (z, y, x) of training phantom `index`: 2 mm in-plane (a 512 mm field of view,
    wide enough for any body), 2-3 mm slices, a 350-900 mm scan. Coarser than real scans so that
    generating ~100 cases takes minutes; the engine's resampling to 3 mm then removes most of the
    difference (the phantoms' noise and lesion edges are drawn per voxel, at any spacing)."""
    rng = np.random.default_rng([seed, index, 7])
    spacing_z = float(rng.choice([2.0, 2.5, 3.0]))
    n_z = int(round(rng.uniform(350.0, 900.0) / spacing_z))
    return (n_z, 256, 256), (spacing_z, 2.0, 2.0)


def cropped_phantom(seed: int, index: int, raw_dir: Path) -> tuple[dict, np.ndarray]:
    """Phantom `index`, body-cropped as the engine crops: raw HU (int16) and label stored under `raw_dir`;
    returns its metadata and its cropped tissue map (the hard negatives are drawn from it in case order)."""
    stem = raw_dir / f"case_{index:04d}"
    shape, spacing = training_geometry(seed, index)
    phantom = generate_phantom(seed, index, shape_zyx=shape, spacing_zyx=spacing, with_tissue=True)
    spacing = tuple(float(s) for s in phantom.image.GetSpacing())[::-1]
    array = sitk.GetArrayFromImage(phantom.image)
    label = sitk.GetArrayFromImage(phantom.label)
    box = crop_box(array, spacing, PredictionSettings())
    np.save(stem.with_name(stem.name + "_image.npy"), np.ascontiguousarray(array[box]))
    np.save(stem.with_name(stem.name + "_label.npy"), np.ascontiguousarray(label[box] > 0))
    meta = {"index": index, "generator_version": GENERATOR_VERSION, "spacing": list(spacing),
            "shape": list(array.shape), "cropped_shape": [s.stop - s.start for s in box],
            "lesions": [[les["type"], les["diameter_mm"]] for les in phantom.info["lesions"]]}
    return meta, np.ascontiguousarray(phantom.tissue[box])


def generate_cropped_cases(seed: int, n_cases: int, raw_dir: Path, workers: int = 1) -> list[dict]:
    """Generate the phantoms (in `workers` processes), body-crop them as the engine does, store raw HU
    (int16), labels and a sample of hard-negative voxels ([n, 4] int32: tissue class, z, y, x in the
    cropped grid). The negatives are drawn here, case after case from one stream, so any number of
    workers gives the same files."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])
    done = {}
    for index in range(n_cases):  # a resumed run: the cases already made by this generator
        meta_path = raw_dir / f"case_{index:04d}.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("generator_version") == GENERATOR_VERSION:
            done[index] = meta
    todo = [index for index in range(n_cases) if index not in done]
    pool = None
    if workers > 1 and len(todo) > 1:  # forkserver: no fork of a process that may hold a CUDA context
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    try:
        made = pool.map(partial(cropped_phantom, seed, raw_dir=raw_dir), todo) if pool else \
            (cropped_phantom(seed, index, raw_dir) for index in todo)
        for meta, tissue in tqdm(made, total=len(todo), desc="phantoms", unit="case"):
            stem = raw_dir / f"case_{meta['index']:04d}"
            np.save(stem.with_name(stem.name + "_negatives.npy"), hard_negative_voxels(tissue, rng))
            stem.with_suffix(".json").write_text(json.dumps(meta))
            done[meta["index"]] = meta
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # after a failure, the queued phantoms are not made
    return [done[index] for index in range(n_cases)]


def hard_negative_voxels(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to HARD_NEGATIVES_PER_TISSUE random voxels of each HARD_NEGATIVE_TISSUES class: [n, 4] int32
    rows (class, z, y, x)."""
    rows = []
    for tissue_class in HARD_NEGATIVE_TISSUES:
        flat = np.flatnonzero(tissue == tissue_class)
        if flat.size:
            flat = rng.choice(flat, min(flat.size, HARD_NEGATIVES_PER_TISSUE), replace=False)
            zyx = np.stack(np.unravel_index(flat, tissue.shape), 1)
            rows.append(np.concatenate([np.full((len(flat), 1), tissue_class), zyx], 1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def foreground_intensity_properties(raw_dir: Path, cases: list[dict], seed: int) -> dict:
    """CTNormalization statistics over a sample of every case's foreground voxels (see FOREGROUND)."""
    rng = np.random.default_rng(seed)
    samples = []
    for case in cases:
        stem = raw_dir / f"case_{case['index']:04d}"
        image = np.load(stem.with_name(stem.name + "_image.npy"))
        values = image[image > BODY_THRESHOLD_HU]
        if values.size == 0:
            continue
        take = min(values.size, FOREGROUND_SAMPLES_PER_CASE)
        samples.append(rng.choice(values, take, replace=False).astype(np.float64))
    if not samples:
        raise SystemExit("error: no body voxels in the training phantoms")
    values = np.concatenate(samples)
    return {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_99_5": float(np.percentile(values, 99.5)),
            "percentile_00_5": float(np.percentile(values, 0.5))}


def write_folder(out_dir: Path, intensity_properties: dict, median_shape: list[int], n_cases: int,
                 weights: dict | None, checkpoint_name: str = "checkpoint_final.pth",
                 light_decoder: bool = False, patch_size=PATCH_SIZE, base_features: int = BASE_FEATURES) -> None:
    convs = dict(n_conv_per_stage=LIGHT_ENCODER_CONVS, n_conv_per_stage_decoder=LIGHT_DECODER_CONVS) \
        if light_decoder else {}
    arch_kwargs = plain_unet_arch_kwargs(N_STAGES, base_features=base_features, max_features=MAX_FEATURES,
                                         **convs)
    plans = make_plans(spacing=list(SPACING), patch_size=list(patch_size), arch_kwargs=arch_kwargs,
                       intensity_properties=intensity_properties, dataset_name="Dataset001_Phantoms",
                       median_shape=median_shape)
    dataset_json = make_dataset_json({"background": 0, "lesion": 1}, num_training=n_cases)
    if weights is None:  # an untrained network just to make the folder loadable
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "plans.json").write_text(json.dumps(plans, indent=2))
        (out_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        weights = build_network(read_model_config(out_dir)).state_dict()
    write_model_folder(out_dir, plans, dataset_json, {"all": weights}, checkpoint_name=checkpoint_name)


# ---- 3. model space ---------------------------------------------------------------------------------------

def training_target(label: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A [z, y, x] lesion mask on the model grid `shape` as training sees it: trilinear, > 0.5 (nnU-Net's
    order-1 label resampling, for one label). Bool tensor."""
    return resample_channels(label.float()[None], shape)[0] > 0.5


def preprocess_cases(raw_dir: Path, cache_dir: Path, cases: list[dict], model) -> list[dict]:
    """Normalise + resample every case with the engine's own code; cache float16 image, uint8 label."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    prepared = []
    for case in tqdm(cases, desc="preprocess", unit="case"):
        stem = raw_dir / f"case_{case['index']:04d}"
        out_image = cache_dir / f"case_{case['index']:04d}_image.npy"
        out_label = cache_dir / f"case_{case['index']:04d}_label.npy"
        if not (out_image.exists() and out_label.exists()):
            image = np.load(stem.with_name(stem.name + "_image.npy"))
            label = np.load(stem.with_name(stem.name + "_label.npy"))
            volume = to_model_space(image, tuple(case["spacing"]), model)  # [1, z, y, x] float32
            shape = tuple(volume.shape[1:])
            mask = training_target(torch.from_numpy(label), shape)
            np.save(out_label, mask.numpy().astype(np.uint8))
            np.save(out_image, volume[0].numpy().astype(np.float16))
        label = np.load(out_label)
        # voxels of each lesion (connected component) apart: patches are centred on a random lesion
        # first, so that small lesions are seen as often as large ones
        components = cc3d.connected_components(label, connectivity=26)
        order = np.argsort(components, axis=None, kind="stable")
        sorted_ids = components.ravel()[order]
        bounds = np.searchsorted(sorted_ids, np.arange(1, sorted_ids.max() + 2)) if sorted_ids.max() else []
        lesions = [np.stack(np.unravel_index(order[a:b], label.shape), 1).astype(np.int32)
                   for a, b in zip(bounds[:-1], bounds[1:])]
        negatives_path = stem.with_name(stem.name + "_negatives.npy")
        negatives = np.load(negatives_path) if negatives_path.exists() else np.zeros((0, 4), np.int32)
        # cropped grid -> model grid (pixel centres, as the trilinear resampling maps them)
        scale = np.array(label.shape) / np.array(case["cropped_shape"])
        zyx = np.floor((negatives[:, 1:] + 0.5) * scale).astype(np.int32)
        zyx = np.minimum(zyx, np.array(label.shape) - 1)
        hard_negatives = [zyx[negatives[:, 0] == c] for c in HARD_NEGATIVE_TISSUES]
        prepared.append({"image": np.load(out_image), "label": label, "lesions": lesions,
                         "lesion_voxels": np.concatenate(lesions) if lesions else None,
                         "hard_negatives": [v for v in hard_negatives if len(v)]})
    return prepared


# ---- 4. training ------------------------------------------------------------------------------------------

def crop_patch(array: np.ndarray, start: np.ndarray, patch: tuple[int, ...], fill) -> np.ndarray:
    """array[start:start+patch], padded with `fill` where the patch leaves the volume."""
    out = np.full(patch, fill, dtype=array.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch, array.shape):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def patch_start_around(centre: np.ndarray, rng: np.random.Generator, patch_size=PATCH_SIZE) -> np.ndarray:
    """Start of a `patch_size` patch around `centre`, shifted by up to a quarter patch on each axis (so the
    voxel is not always in the middle, and always inside)."""
    patch = np.array(patch_size)
    return centre - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1)


def sample_batch(cases: list[dict], rng: np.random.Generator, patch_size=PATCH_SIZE,
                 batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` patches: FOREGROUND_FRACTION centred (with jitter) on a lesion voxel,
    HARD_NEGATIVE_FRACTION on a voxel of a lesion look-alike tissue, the rest anywhere."""
    patch = np.array(patch_size)
    with_lesions = [i for i, c in enumerate(cases) if c["lesions"]]
    with_negatives = [i for i, c in enumerate(cases) if c.get("hard_negatives")]
    images, labels = [], []
    for _ in range(batch_size):
        draw = rng.random()
        if with_lesions and draw < FOREGROUND_FRACTION:
            case = cases[with_lesions[rng.integers(len(with_lesions))]]
            if rng.random() < LESION_UNIFORM_SHARE:
                lesion = case["lesions"][rng.integers(len(case["lesions"]))]
                centre = lesion[rng.integers(len(lesion))]
            else:
                centre = case["lesion_voxels"][rng.integers(len(case["lesion_voxels"]))]
            start = patch_start_around(centre, rng, patch_size)
        elif with_negatives and draw < FOREGROUND_FRACTION + HARD_NEGATIVE_FRACTION:
            case = cases[with_negatives[rng.integers(len(with_negatives))]]
            voxels = case["hard_negatives"][rng.integers(len(case["hard_negatives"]))]
            centre = voxels[rng.integers(len(voxels))]
            start = patch_start_around(centre, rng, patch_size)
        else:
            case = cases[rng.integers(len(cases))]
            shape = np.array(case["image"].shape)
            # anywhere, the patch may stick out by up to a quarter (the sliding window pads too)
            low, high = -patch // 4, np.maximum(shape - patch + patch // 4, -patch // 4)
            start = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
        image = crop_patch(case["image"], start, tuple(patch_size), 0).astype(np.float32)
        label = crop_patch(case["label"], start, tuple(patch_size), 0)
        for axis in range(3):
            if rng.random() < 0.5:
                image, label = np.flip(image, axis), np.flip(label, axis)
        # mild intensity jitter in normalised units (contrast and brightness differ between scanners)
        image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
        images.append(np.ascontiguousarray(image))
        labels.append(np.ascontiguousarray(label))
    # channels-last: oneDNN's 3D convolutions are faster on the CPU in that layout
    return (torch.from_numpy(np.stack(images))[:, None].contiguous(memory_format=torch.channels_last_3d),
            torch.from_numpy(np.stack(labels)).long())


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice of the lesion class over the batch), nnU-Net's default loss shape."""
    ce = F.cross_entropy(logits, target)
    probabilities = logits.softmax(1)[:, 1]
    foreground = (target == 1).float()
    intersection = (probabilities * foreground).sum()
    dice = (2 * intersection + 1e-5) / (probabilities.sum() + foreground.sum() + 1e-5)
    return ce + (1 - dice)


def deep_supervision_loss(outputs, target: torch.Tensor) -> torch.Tensor:
    """Weighted loss over the highest-resolution outputs; targets downsampled by max-pooling."""
    weights = [2.0 ** -i for i in range(DEEP_SUPERVISION_LEVELS)]
    total = 0.0
    for level, weight in enumerate(weights):
        if level == 0:
            level_target = target
        else:
            level_target = F.max_pool3d(target[:, None].float(), 2 ** level)[:, 0].long()
        total = total + weight * dice_ce_loss(outputs[level], level_target)
    return total / sum(weights)


def forward_loss(forward, images: torch.Tensor, labels: torch.Tensor, bf16: bool,
                 device_type: str = "cpu") -> torch.Tensor:
    """The deep-supervision loss of one batch. With bf16 the forward pass runs under autocast and the loss
    in fp32, as AMP does: a bf16 sum over a batch's voxels keeps only 8 bits of mantissa."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        outputs = forward(images)
    return deep_supervision_loss([output.float() for output in outputs], labels)


def learning_rate(progress: float, step: int, peak: float = LEARNING_RATE) -> float:
    """Linear warm-up, then nnU-Net's poly decay (1 - progress)^0.9, progress in [0, 1]."""
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    return peak * warmup * max(0.0, 1.0 - progress) ** 0.9


def bottleneck_in_fp32(network) -> None:
    """Run the deepest encoder stage outside bf16 autocast. oneDNN's bf16 weight gradient of its
    convolution (128 channels on 2^3 voxels) came back NaN on 3 of 150 to 19 of 60 steps in short trials,
    not reproducibly for the same batch and weights; with this stage in fp32, 0 of 600. The stage is a tiny
    share of the work; experiments/profile_training_step.py --compare-bf16 times bf16 steps with it."""
    stage = network.encoder.stages[-1]
    forward_bf16 = stage.forward

    def forward(x):
        with torch.autocast("cpu", enabled=False):
            return forward_bf16(x.float())
    stage.forward = forward


def save_latest(path: Path, network, optimizer, step: int, elapsed: float, rng_state, save_weights) -> None:
    """Training state (for --resume) and fold_all/checkpoint_latest.pth (loadable with -chk)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"network": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed": elapsed, "rng": rng_state, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)
    save_weights(network.state_dict(), "checkpoint_latest.pth")


def train(network, cases: list[dict], out_dir: Path, args, deadline: float, log: dict, save_weights):
    rng = np.random.default_rng(args.seed + 1)
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.learning_rate, weight_decay=WEIGHT_DECAY)
    state_path = out_dir / "training_state.pth"
    step, trained_before = 0, 0.0
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location=args.device, weights_only=False)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        step, trained_before = state["step"], state["elapsed"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
    start = time.time()
    budget = trained_before + max(1.0, deadline - start)  # seconds of training in all
    last_save, losses = time.time(), []
    network.train()
    device = torch.device(args.device)
    patch, batch_size = tuple(args.patch), args.batch_size
    forward = network
    if args.compile:
        forward = torch.compile(network)
        try:  # compiles now: needs a C++ compiler, which a bare machine may lack
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                forward(sample_batch(cases, np.random.default_rng(0), patch, batch_size)[0].to(device))
        except Exception as error:  # noqa: BLE001 - any compiler failure: train eagerly instead
            print(f"warning: torch.compile failed ({type(error).__name__}); training eagerly", file=sys.stderr)
            forward = network
    log["compiled"] = forward is not network
    skipped = 0
    bar = tqdm(total=args.steps, desc="train", unit="step", initial=step)
    while True:
        elapsed = trained_before + time.time() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, step, args.learning_rate)
        images, labels = sample_batch(cases, rng, patch, batch_size)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = forward_loss(forward, images, labels, args.bf16, device.type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        if torch.isfinite(gradient_norm):
            optimizer.step()
        else:  # a non-finite gradient would turn every weight into NaN: skip the batch, as AMP's scaler does
            skipped += 1
        losses.append(loss.item())
        step += 1
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                            min=f"{elapsed / 60:.1f}")
        if step % 50 == 0:
            log["loss_curve"].append([step, round(elapsed, 1), float(np.mean(losses[-50:]))])
        if time.time() - last_save > args.save_every * 60:
            save_latest(state_path, network, optimizer, step, elapsed, rng.bit_generator.state, save_weights)
            last_save = time.time()
    bar.close()
    if losses and (not log["loss_curve"] or log["loss_curve"][-1][0] != step):  # the curve ends at the last step
        log["loss_curve"].append([step, round(trained_before + time.time() - start, 1), float(np.mean(losses[-50:]))])
    log["steps"] = step
    log["skipped_steps"] = skipped
    log["train_seconds"] = round(trained_before + time.time() - start, 1)
    log["final_loss"] = float(np.mean(losses[-50:])) if losses else None


def starting_point(model_dir: Path, config) -> dict:
    """What a fine-tuning run started from (`config`: its plans), for its training log: the folder, the fingerprint of
    its weights and plans, and the steps and seed of its own training where its log says."""
    checkpoint = model_dir / "fold_all" / "checkpoint_final.pth"
    try:
        earlier = json.loads((model_dir / "training_log.json").read_text())
    except (OSError, ValueError):  # no log, or not one: what it says is unknown
        earlier = {}
    earlier = earlier if isinstance(earlier, dict) else {}
    return {"folder": display(model_dir),
            "fingerprint": model_fingerprint(model_dir, config.configuration, [("all", checkpoint)]),
            "seed": earlier.get("seed"), "steps": earlier.get("steps"),
            "train_seconds": earlier.get("train_seconds"), "init_from": earlier.get("init_from")}


def main(argv=None) -> int:
    args = parse_args(argv)
    wall_start = time.time()
    deadline = wall_start + args.minutes * 60 - 20  # keep 20 s to write the folder
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: this torch build or machine has no CUDA device")
    np.random.seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="train_default_"))
    log = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "seed": args.seed,
           # steps per minute, hence the model a time budget buys, depends on the CPU's vector units
           "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cases": args.cases, "threads": args.threads, "precision": "bf16 autocast" if args.bf16 else "fp32",
           "learning_rate": args.learning_rate, "light_decoder": args.light_decoder,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "patch_size": list(args.patch), "base_features": args.base_features, "batch_size": args.batch_size,
           "workers": args.workers,
           "patch_fractions": {
               "lesion": FOREGROUND_FRACTION, "hard_negative": HARD_NEGATIVE_FRACTION,
               "random": round(1 - FOREGROUND_FRACTION - HARD_NEGATIVE_FRACTION, 3)}, "loss_curve": []}
    try:
        cases = generate_cropped_cases(args.seed, args.cases, work_dir / "raw", args.workers)
        log["generate_seconds"] = round(time.time() - wall_start, 1)
        if args.init_from:
            start_config = read_model_config(args.init_from)
            properties = start_config.intensity_properties
            log["init_from"] = starting_point(Path(args.init_from), start_config)
        else:
            properties = foreground_intensity_properties(work_dir / "raw", cases, args.seed)
        cropped_mm = np.array([[n * s for n, s in zip(c["cropped_shape"], c["spacing"])] for c in cases])
        median_shape = [int(round(m / s)) for m, s in zip(np.median(cropped_mm, axis=0), SPACING)]
        # an untrained folder in the work dir, only so that preprocessing runs through the engine's loader
        architecture_kwargs = dict(light_decoder=args.light_decoder, patch_size=tuple(args.patch),
                                   base_features=args.base_features)
        write_folder(work_dir / "init_model", properties, median_shape, args.cases, weights=None,
                     **architecture_kwargs)
        model = load_model(work_dir / "init_model", device="cpu")
        prepared = preprocess_cases(work_dir / "raw", work_dir / "cache", cases, model)
        log["prepare_seconds"] = round(time.time() - wall_start, 1)
        network = build_network(read_model_config(work_dir / "init_model"))
        if args.init_from:
            weights = load_checkpoint(Path(args.init_from) / "fold_all" / "checkpoint_final.pth")["network_weights"]
            try:
                network.load_state_dict(weights)
            except RuntimeError as error:
                raise SystemExit(f"error: --init-from {args.init_from}: its weights do not fit the network these "
                                 f"flags build ({str(error).splitlines()[0]})") from None
        network.decoder.deep_supervision = True  # training only; the saved weights are the same
        network = network.to(device, memory_format=torch.channels_last_3d)
        if args.bf16 and device.type == "cpu":  # the NaN it avoids is oneDNN's (CPU) bf16 weight gradient
            bottleneck_in_fp32(network)
        print(f"{sum(p.numel() for p in network.parameters()) / 1e6:.2f} M parameters; "
              f"{len(prepared)} cases, {sum(bool(c['lesions']) for c in prepared)} with lesions, "
              f"{sum(len(c['lesions']) for c in prepared)} lesions at model spacing",
              file=sys.stderr)

        def save_weights(weights, name):
            weights = {key: value.detach().cpu() for key, value in weights.items()}  # loadable on any machine
            write_folder(out_dir, properties, median_shape, args.cases, weights, checkpoint_name=name,
                         **architecture_kwargs)

        train(network, prepared, out_dir, args, deadline, log, save_weights)
        network.decoder.deep_supervision = False
        network = network.to("cpu", memory_format=torch.contiguous_format)
        save_weights(network.state_dict(), "checkpoint_final.pth")
        # the run finished: the resume state and the intermediate checkpoint are not part of the model
        for leftover in (out_dir / "training_state.pth", out_dir / "fold_all" / "checkpoint_latest.pth"):
            leftover.unlink(missing_ok=True)
        log["wall_seconds"] = round(time.time() - wall_start, 1)
        log["intensity_properties"] = properties
        (out_dir / "training_log.json").write_text(json.dumps(log, indent=2))
        print(json.dumps({k: v for k, v in log.items() if k != "loss_curve"}, indent=2), file=sys.stderr)
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
