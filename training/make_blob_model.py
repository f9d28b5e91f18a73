"""Train a small nnU-Net v2 model on synthetic CT "blob" volumes, on the CPU, in a few minutes.

The model is only a vehicle for comparing inference engines (benchmarks/parity_nnunet.py): it has to be
a real nnU-Net v2 model folder, that both nnU-Net's `nnUNetPredictor` and our engine load, and give
non-trivial masks, so that the two engines' masks can be compared where it matters (lesion borders).

    python training/make_blob_model.py --out work/parity/Dataset900_Blobs/nnUNetTrainer__nnUNetPlans__3d_fullres

The synthetic volumes (`synthesize_case`) are CT-like in HU: air outside an elliptic body, fat and soft
tissue inside, a bright spine, Gaussian noise and ellipsoid "lesions", brighter or darker than the
tissue around them (label 1). The same function makes the test cases of the parity benchmark.

The network is a 4-stage PlainConvUNet (8-64 features), patch 48^3 at 2 mm, built from the written plans
by the engine's own `build_network`, trained as nnU-Net trains (CTNormalization with the foreground's
intensity statistics, Dice + cross-entropy, 1/3 lesion-centred patches, mirroring) but briefly: 300 steps
of batch 2, about 4-5 CPU minutes on one thread. It reaches a Dice of roughly 0.75 against the synthetic
truth: good enough to have real, uncertain lesion borders, which is where two engines can disagree.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from inference.model import build_network, read_model_config
from training.model_folder import (make_dataset_json, make_plans, plain_unet_arch_kwargs,
                                    write_model_folder)

REPO = Path(__file__).resolve().parent.parent


MODEL_SPACING = (2.0, 2.0, 2.0)  # (z, y, x) mm
PATCH_SIZE = (48, 48, 48)  # the plans' training patch, the one nnU-Net slides at inference (9.6 cm)
TRAIN_VOLUME_SHAPE = (96, 96, 96)  # at MODEL_SPACING: a 19 cm field of view, patches are cropped from it
DEFAULT_FOLDER = "Dataset900_Blobs/nnUNetTrainer__nnUNetPlans__3d_fullres"

AIR_HU, FAT_HU, TISSUE_HU, BONE_HU = -1000.0, -100.0, 50.0, 450.0
NOISE_HU = 12.0


def smooth_noise(shape, spacing, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (a smooth random texture)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                    sigma=[sigma_mm / s for s in spacing], mode="wrap")
    return field / max(float(field.std()), 1e-6)


def synthesize_case(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                    rng: np.random.Generator, n_lesions: tuple[int, int] = (2, 6)
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like (z, y, x) int16 volume in HU and its uint8 lesion label, for (z, y, x) spacing in mm."""
    spacing = tuple(float(s) for s in spacing)
    # millimetre coordinates, centred on the volume
    zz, yy, xx = (((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing))
    zz, yy, xx = zz[:, None, None], yy[None, :, None], xx[None, None, :]
    extent_y, extent_x = shape[1] * spacing[1], shape[2] * spacing[2]
    body_a = extent_y * rng.uniform(0.36, 0.44)  # anterior-posterior semi-axis
    body_b = extent_x * rng.uniform(0.40, 0.46)
    body = (yy / body_a) ** 2 + (xx / body_b) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)

    texture = smooth_noise(shape, spacing, 12.0, rng)
    tissue = texture > rng.uniform(-1.3, -0.9)  # mostly soft tissue, islands of fat
    image = np.where(body, np.where(tissue, TISSUE_HU, FAT_HU), AIR_HU).astype(np.float32)
    image += np.where(body & tissue, 8.0 * smooth_noise(shape, spacing, 6.0, rng), 0.0)

    spine_y, spine_r = body_a * 0.6, rng.uniform(9.0, 13.0)
    spine = ((yy - spine_y) ** 2 + xx ** 2 <= spine_r ** 2) & np.ones(shape, bool)
    image[spine] = BONE_HU

    label = np.zeros(shape, np.uint8)
    margin = np.array([4.0, 0.0, 0.0])
    for _ in range(rng.integers(n_lesions[0], n_lesions[1] + 1)):
        radii = rng.uniform(5.0, 15.0, size=3)
        for _attempt in range(50):  # a centre inside the body, clear of the spine and the volume edge
            centre = np.array([rng.uniform(-1, 1) * max((n - 1) / 2 * s - r - m, 0)
                               for n, s, r, m in zip(shape, spacing, radii, margin)])
            inside = (centre[1] / (body_a - radii[1] - 3)) ** 2 + (centre[2] / (body_b - radii[2] - 3)) ** 2
            clear_of_spine = math.hypot(centre[1] - spine_y, centre[2]) > spine_r + radii[1:].max() + 3
            if inside < 1.0 and clear_of_spine:
                break
        else:
            continue
        lesion = (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                  + ((xx - centre[2]) / radii[2]) ** 2) <= 1.0
        delta = rng.uniform(60.0, 120.0) if rng.random() < 0.5 else -rng.uniform(45.0, 60.0)
        image[lesion] = TISSUE_HU + delta + 6.0 * rng.standard_normal()
        label[lesion] = 1

    # partial volume (a little blur, half a voxel), then scanner noise
    image = ndimage.gaussian_filter(image, sigma=0.5)
    image += NOISE_HU * rng.standard_normal(shape).astype(np.float32)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def write_blob_cases(images: Path, labels: Path, cases: int, seed: int, shape: tuple[int, int, int],
                     spacing: tuple[float, float, float], n_lesions: tuple[int, int] = (3, 5)) -> None:
    """`cases` volumes of synthesize_case, one generator seeded with `seed`, written as images/blob_NNN_0000.nii.gz
    and labels/blob_NNN.nii.gz (nnU-Net's raw layout, and the engine's): what nnU-Net's trainer is trained on
    (make_nnunet_trained_model.py) and the cases it is validated on (nnunet_trained.py)."""
    import SimpleITK as sitk

    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(cases):
        volume, label = synthesize_case(shape, spacing, rng, n_lesions=n_lesions)
        for array, path in ((volume, images / f"blob_{index:03d}_0000.nii.gz"),
                            (label, labels / f"blob_{index:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(tuple(spacing)[::-1])
            sitk.WriteImage(image, str(path))


def foreground_intensity_properties(volumes, labels) -> dict:
    """What nnU-Net's fingerprint stores for channel 0: statistics of the labelled foreground's HU."""
    values = np.concatenate([v[lab > 0].astype(np.float64) for v, lab in zip(volumes, labels)])
    return {
        "mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
        "min": float(values.min()), "max": float(values.max()),
        "percentile_00_5": float(np.percentile(values, 0.5)),
        "percentile_99_5": float(np.percentile(values, 99.5)),
    }


def ct_normalise(volume: np.ndarray, props: dict) -> np.ndarray:
    """CTNormalization, exactly as at inference: clip to the percentiles, subtract mean, divide std."""
    volume = np.clip(volume.astype(np.float32), props["percentile_00_5"], props["percentile_99_5"])
    return (volume - props["mean"]) / max(props["std"], 1e-8)


def random_patch(volume: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 foreground: bool) -> tuple[np.ndarray, np.ndarray]:
    """A PATCH_SIZE crop, centred on a random lesion voxel when `foreground` (nnU-Net oversamples 1/3)."""
    if foreground and label.any():
        candidates = np.argwhere(label > 0)
        centre = candidates[rng.integers(len(candidates))]
        starts = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, n - p))
                  for c, p, n in zip(centre, PATCH_SIZE, volume.shape)]
    else:
        starts = [int(rng.integers(0, n - p + 1)) for p, n in zip(PATCH_SIZE, volume.shape)]
    box = tuple(slice(s, s + p) for s, p in zip(starts, PATCH_SIZE))
    patch, patch_label = volume[box], label[box]
    for axis in range(3):  # mirroring augmentation
        if rng.random() < 0.5:
            patch, patch_label = np.flip(patch, axis), np.flip(patch_label, axis)
    return np.ascontiguousarray(patch), np.ascontiguousarray(patch_label)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's default loss: cross-entropy + soft Dice of the foreground classes (batch dice off)."""
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    dice = (2 * intersection + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
    return ce + (1 - dice.mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def train(out_dir: Path, steps: int = 300, seed: int = 0, batch_size: int = 2, base_features: int = 8,
          n_train_volumes: int = 16, quiet: bool = False) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    volumes, labels = zip(*(synthesize_case(TRAIN_VOLUME_SHAPE, MODEL_SPACING, rng)
                            for _ in range(n_train_volumes)))
    props = foreground_intensity_properties(volumes, labels)

    arch = plain_unet_arch_kwargs(n_stages=4, base_features=base_features)
    plans = make_plans(spacing=list(MODEL_SPACING), patch_size=list(PATCH_SIZE), arch_kwargs=arch,
                       intensity_properties=props, dataset_name=out_dir.parent.name or "Dataset900_Blobs",
                       median_shape=list(TRAIN_VOLUME_SHAPE))
    dataset_json = make_dataset_json(num_training=n_train_volumes)
    # Plans first, then the network exactly as both engines will build it from these plans.
    write_model_folder(out_dir, plans, dataset_json, {})
    network = build_network(read_model_config(out_dir))
    normalised = [ct_normalise(v, props) for v in volumes]

    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - s / steps) ** 0.9)
    network.train()
    losses = []
    for step in tqdm(range(steps), desc="training", disable=quiet):
        batch = [random_patch(normalised[i], labels[i], rng, foreground=(k == 0 or rng.random() < 0.33))
                 for k, i in enumerate(rng.integers(0, n_train_volumes, batch_size))]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))[:, None]
        y = torch.from_numpy(np.stack([b[1] for b in batch])).long()
        loss = dice_ce_loss(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
    train_seconds = time.perf_counter() - started

    # a quick check on held-out volumes (whole volumes in one forward pass, no sliding window)
    network.eval()
    held_out = [synthesize_case(TRAIN_VOLUME_SHAPE, MODEL_SPACING, rng) for _ in range(2)]
    scores = []
    with torch.inference_mode():
        for volume, label in held_out:
            x = torch.from_numpy(ct_normalise(volume, props))[None, None]
            scores.append(dice(network(x)[0].argmax(0).numpy() > 0, label > 0))

    write_model_folder(out_dir, plans, dataset_json, {"all": network.state_dict()})
    summary = {"steps": steps, "seed": seed, "batch_size": batch_size, "base_features": base_features,
               "train_seconds": round(train_seconds, 1),
               "final_loss_mean_last_20": float(np.mean(losses[-20:])),
               "held_out_dsc": [round(s, 4) for s in scores],
               "intensity_properties": props}
    (out_dir / "blob_training.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "work" / "parity" / DEFAULT_FOLDER),
                        help="model folder to write (nnU-Net v2 layout; name it Trainer__Plans__3d_fullres)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-features", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the machine is shared, and one thread wastes least)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = train(Path(args.out), steps=args.steps, seed=args.seed, base_features=args.base_features)
    print(json.dumps({k: v for k, v in summary.items() if k != "intensity_properties"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
