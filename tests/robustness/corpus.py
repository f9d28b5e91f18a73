"""A corpus of bad inputs, faults and hostile model folders, each with the behaviour the engine must show.

    .venv/bin/python -m tests.robustness.corpus [--out DIR] [--table docs/robustness.md]

builds every scenario under DIR (a temporary folder by default), runs the real command on it (`python -m
inference`, `python -m inference.export_onnx` or `python -m evaluation.run_metrics`, a fresh process each)
and checks the outcome: the exit code, the one line that names the file and the problem, no traceback, the
exact set of files left in the output folder (no partial or stray file), the other cases' masks, and that
no marker file written by a hostile model folder's code ever appears. With --table it writes the table of
docs/robustness.md from what it saw, so that the table stays true. tests/robustness/test_robustness.py runs
the same scenarios under pytest, one test each.

Scenarios that need a mount (a full disk, a read-only output folder) are skipped with the reason where
mounting is not possible (not root).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from training.model_folder import (SYNTHETIC_CT_INTENSITIES, make_dataset_json, make_plans,
                                    plain_unet_arch_kwargs, write_random_model_folder)

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
MARKER = "CODE_RAN"  # written by the hostile model folder's Python file if it is ever imported


# ------------------------------------------------------------------------------------------ ingredients

def toy_model(folder: Path, seed: int = 0) -> Path:
    """A small 3-stage U-Net model folder (random weights, 3 mm, 32^3 patch)."""
    arch = plain_unet_arch_kwargs(n_stages=3, base_features=4)
    plans = make_plans(spacing=[3.0, 3.0, 3.0], patch_size=[32, 32, 32], arch_kwargs=arch,
                       intensity_properties=SYNTHETIC_CT_INTENSITIES)
    return write_random_model_folder(folder, plans, make_dataset_json(), seed=seed)


def ct_image(shape_zyx=(16, 40, 40), spacing_xyz=(2.0, 2.0, 3.0), dtype=np.int16, seed: int = 0) -> sitk.Image:
    """Air around a soft-tissue body holding a bright blob, with noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    array = np.full(shape_zyx, -1000.0)
    array[(y / 0.8) ** 2 + (x / 0.8) ** 2 < 1] = 40.0
    array[(z ** 2 + (y - 0.1) ** 2 + (x + 0.2) ** 2) < 0.1] = 180.0
    image = sitk.GetImageFromArray((array + rng.normal(0, 10, shape_zyx)).astype(dtype))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin((10.0, -20.0, 5.0))
    return image


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def hostile_model(root: Path, edit: Callable[[dict], None]) -> Path:
    """The toy model with plans.json edited by `edit`, and a Python file beside it that writes MARKER into
    the model folder when imported (a model folder must never run code)."""
    model = toy_model(root / "model")
    plans_path = model / "plans.json"
    plans = json.loads(plans_path.read_text())
    edit(plans)
    plans_path.write_text(json.dumps(plans))
    code = f"from pathlib import Path\nPath(__file__).with_name({MARKER!r}).write_text('ran')\n"
    (model / "evil.py").write_text(code)
    (model / "__init__.py").write_text(code)
    return model


def arch_kwargs(plans: dict) -> dict:
    return plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]


def set_network_class(name: str) -> Callable[[dict], None]:
    return lambda plans: plans["configurations"]["3d_fullres"]["architecture"].__setitem__("network_class_name", name)


def set_op(key: str, name: str, op_kwargs: dict | None = None) -> Callable[[dict], None]:
    def edit(plans):
        arch_kwargs(plans)[key] = name
        if op_kwargs is not None:
            arch_kwargs(plans)[f"{key}_kwargs"] = op_kwargs
    return edit


def mount_tmpfs(folder: Path, size: str, read_only: bool = False) -> str | None:
    """Mount a small tmpfs on `folder`; the reason it cannot be done, or None."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"mount: {error}"
    return None if result.returncode == 0 else f"cannot mount a tmpfs here: {result.stderr.strip()[:120]}"


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


# ----------------------------------------------------------------------------------------------- scenarios

@dataclass
class Setup:
    """What a scenario's builder made: the command's arguments and what to check afterwards."""

    args: list[str]
    command: str = "inference"                    # python -m <command>
    outputs: Path | None = None                   # the folder whose exact content is checked
    expected_outputs: list[str] = field(default_factory=list)
    same_masks: dict[str, Path] = field(default_factory=dict)  # output name -> the reference mask it must equal
    marker_dirs: list[Path] = field(default_factory=list)      # where a hostile model's MARKER must not appear
    cleanup: Callable[[], None] | None = None
    skip: str | None = None                        # why the scenario cannot run here
    interrupt_after: str | None = None             # send SIGTERM once stderr shows this text
    env: dict[str, str] = field(default_factory=dict)  # added to the command's environment
    interrupt_on_partial: Path | None = None       # send SIGTERM once a partial mask exists in this folder
    whole_masks_of: int | None = None              # instead of expected_outputs: only whole masks, fewer than this


@dataclass
class Scenario:
    name: str
    defect: str            # the class of defect, as issue 21 numbers them
    fault: str             # the input or fault, for the table
    build: Callable[[Path, "Reference"], Setup]
    exit_code: int
    says: list[str]        # substrings of stderr (regular expressions), in one line each
    error_lines: int | None = None  # number of stderr lines starting with "error" (None: not checked)
    max_seconds: float | None = None  # the command must end within this (None: RUN_TIMEOUT_S)


@dataclass
class Reference:
    """Shared by the scenarios of one run: the toy model and a good case with its mask."""

    model: Path
    good_image: Path
    good_mask: Path


def make_reference(root: Path) -> Reference:
    model = toy_model(root / "reference" / "model")
    good = write(ct_image(), root / "reference" / "in" / "good_0000.nii.gz")
    out = root / "reference" / "out"
    result = run_command("inference", ["-i", str(good.parent), "-o", str(out), "-m", str(model), "--device", "cpu",
                                       "--quiet"])
    if result.returncode != 0:
        raise RuntimeError(f"the reference run failed: {result.stderr}")
    return Reference(model, good, out / "good.nii.gz")


def engine_args(inputs: Path, outputs: Path, model: Path, *extra: str) -> list[str]:
    return ["-i", str(inputs), "-o", str(outputs), "-m", str(model), "--device", "cpu", "--quiet", *extra]


def loud(args: list[str]) -> list[str]:
    """The engine's arguments without --quiet: the lines a scenario expects are information, not warnings."""
    return [arg for arg in args if arg != "--quiet"]


def with_good_case(folder: Path, ref: Reference) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ref.good_image, folder / ref.good_image.name)


def payload_importable(root: Path, model: Path) -> dict[str, str]:
    """The environment in which the hostile model folder's code can be imported (`model.evil`, `evil`): with it on
    sys.path, only the engine's guard stands between the plans and the payload, and the marker check can fire
    (tests/robustness/test_robustness.py shows it does where the guard is switched off)."""
    return {"PYTHONPATH": os.pathsep.join([str(root), str(model)])}


def hostile(edit: Callable[[dict], None]) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        model = hostile_model(root, edit)
        with_good_case(root / "in", ref)
        return Setup(engine_args(root / "in", root / "out", model), outputs=root / "out",
                     marker_dirs=[model, REPO], env=payload_importable(root, model))
    return build


HOSTILE_NONLIN = set_op("nonlin", "torch.nn.utils._deprecation_utils.lazy_deprecated_import",
                        {"all": ["x"], "old_module": "a", "new_module": "evil"})
# The network calls nonlin(**nonlin_kwargs): importlib.import_module(name="evil") would run the folder's evil.py.
IMPORTS_BY_NAME = set_op("nonlin", "importlib.import_module", {"name": "evil"})


def hostile_export(root: Path, ref: Reference) -> Setup:
    model = hostile_model(root, HOSTILE_NONLIN)
    return Setup(["-m", str(model)], command="inference.export_onnx", marker_dirs=[model, REPO],
                 env=payload_importable(root, model))


def full_disk(root: Path, ref: Reference) -> Setup:
    out = root / "out"
    reason = mount_tmpfs(out, "256k")
    if reason:
        return Setup([], skip=reason)
    try:
        with open(out / "filler.bin", "wb", buffering=0) as f:  # fill it to the last byte
            while True:
                f.write(b"\0" * 1024)
    except OSError:
        pass
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", out, ref.model), outputs=out, expected_outputs=["filler.bin"],
                 cleanup=lambda: unmount(out))


def read_only_output(root: Path, ref: Reference) -> Setup:
    out = root / "out"
    reason = mount_tmpfs(out, "1m", read_only=True)
    if reason:
        return Setup([], skip=reason)
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", out, ref.model), outputs=out, cleanup=lambda: unmount(out))


def nan_block(root: Path, ref: Reference) -> Setup:
    image = ct_image(dtype=np.float32)
    array = sitk.GetArrayFromImage(image)
    array[2:5, 2:6, 2:6] = np.nan
    array[10, 30, 30] = np.inf
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    write(damaged, root / "in" / "nan_0000.mha")
    return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                 expected_outputs=["nan.nii.gz"])


def collision(names: list[str]) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        for name in names:
            write(ct_image(), root / "in" / name)
        return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out")
    return build


def mask_replaces_input(root: Path, ref: Reference) -> Setup:
    folder = root / "data"
    write(ct_image(), folder / "scan.nii.gz")
    return Setup(engine_args(folder, folder, ref.model), outputs=folder, expected_outputs=["scan.nii.gz"])


def dangling_link(root: Path, ref: Reference) -> Setup:
    with_good_case(root / "in", ref)
    (root / "in" / "gone_0000.nii.gz").symlink_to(root / "deleted_0000.nii.gz")
    return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                 expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": ref.good_mask})


def upper_case_suffix(root: Path, ref: Reference) -> Setup:
    (root / "in").mkdir(parents=True)
    shutil.copy2(ref.good_image, root / "in" / "GOOD_0000.NII.GZ")
    return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                 expected_outputs=["GOOD.nii.gz"], same_masks={"GOOD.nii.gz": ref.good_mask})


def empty_input(root: Path, ref: Reference) -> Setup:
    (root / "in").mkdir(parents=True)
    (root / "in" / "notes.txt").write_text("not an image")
    return Setup(engine_args(root / "in", root / "out", ref.model))


def interrupted(root: Path, ref: Reference) -> Setup:
    write(ct_image(shape_zyx=(60, 160, 160)), root / "in" / "large_0000.nii.gz")
    out = root / "out"
    # a partial folder a killed run left an hour ago (removed), and one a concurrent run is writing (kept)
    stale, live = out / ".flare-partial-old", out / ".flare-partial-live"
    for partial in (stale, live):
        partial.mkdir(parents=True)
        (partial / "large.nii.gz").write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    # a step of 0.05 makes thousands of windows: the run is still in the network when it is stopped
    args = loud(engine_args(root / "in", out, ref.model, "--step-size", "0.05"))
    return Setup(args, outputs=out, expected_outputs=[".flare-partial-live"], interrupt_after="loaded in")


def interrupted_while_writing(root: Path, ref: Reference) -> Setup:
    """Four cases of 1 mm voxels: a few windows each at the model's 3 mm, then a 12-million-voxel mask to write."""
    for index in range(4):
        write(ct_image(shape_zyx=(120, 320, 320), spacing_xyz=(1.0, 1.0, 1.0), seed=index),
              root / "in" / f"case{index}_0000.nii.gz")
    out = root / "out"
    return Setup(loud(engine_args(root / "in", out, ref.model)), outputs=out, interrupt_on_partial=out,
                 whole_masks_of=4)


def output_is_a_file(root: Path, ref: Reference) -> Setup:
    with_good_case(root / "in", ref)
    (root / "out").write_text("a file")
    return Setup(engine_args(root / "in", root / "out", ref.model))


def output_under_a_file(root: Path, ref: Reference) -> Setup:
    with_good_case(root / "in", ref)
    (root / "file").write_text("a file")
    return Setup(engine_args(root / "in", root / "file" / "out", ref.model))


def malformed(edit: Callable[[dict, dict], None]) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        model = toy_model(root / "model")
        plans, dataset = (json.loads((model / name).read_text()) for name in ("plans.json", "dataset.json"))
        edit(plans, dataset)
        (model / "plans.json").write_text(json.dumps(plans))
        (model / "dataset.json").write_text(json.dumps(dataset))
        with_good_case(root / "in", ref)
        return Setup(engine_args(root / "in", root / "out", model), outputs=root / "out")
    return build


def bogus_spacing(spacing_xyz, shape_zyx=(8, 8, 8)) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        write(ct_image(shape_zyx=shape_zyx, spacing_xyz=spacing_xyz), root / "in" / "bogus_0000.nii.gz")
        with_good_case(root / "in", ref)
        return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                     expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": ref.good_mask})
    return build


def on_error_empty(root: Path, ref: Reference) -> Setup:
    setup = bogus_spacing((60.0, 60.0, 60.0))(root, ref)
    setup.args.extend(["--on-error", "empty"])
    setup.expected_outputs.append("bogus.nii.gz")
    return setup


def skewed_sform(root: Path, ref: Reference) -> Setup:
    plain = root / "plain" / "skewed_0000.nii"
    write(sitk.ReadImage(str(ref.good_image)), plain)
    header = bytearray(plain.read_bytes())
    endian = "<"
    srow_y = list(struct.unpack(endian + "4f", header[296:312]))
    srow_y[0] = 0.5  # the x axis gains a y component: axes no longer perpendicular
    struct.pack_into(endian + "4f", header, 296, *srow_y)
    (root / "in").mkdir(parents=True)
    with gzip.open(root / "in" / "skewed_0000.nii.gz", "wb") as f:
        f.write(bytes(header))
    return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                 expected_outputs=["skewed.nii.gz"])


def regzipped(how: str) -> Callable[[Path, Reference], Setup]:
    """The good case re-compressed as two gzip members (bgzip-style), or with zeros after the stream."""
    def build(root: Path, ref: Reference) -> Setup:
        with gzip.open(ref.good_image, "rb") as f:
            raw = f.read()
        (root / "in").mkdir(parents=True)
        target = root / "in" / "good_0000.nii.gz"
        if how == "members":
            half = len(raw) // 2
            target.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
        else:
            target.write_bytes(gzip.compress(raw) + b"\0" * 4096)
        return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                     expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": ref.good_mask})
    return build


def broken_prediction(root: Path, ref: Reference) -> Setup:
    labels, predictions = root / "labels", root / "pred"
    truth = sitk.GetImageFromArray(np.zeros((16, 40, 40), np.uint8))
    truth_array = sitk.GetArrayFromImage(truth)
    truth_array[5:9, 10:20, 10:20] = 1
    truth = sitk.GetImageFromArray(truth_array)
    for case in ("a", "b"):
        write(truth, labels / f"{case}.nii.gz")
    write(truth, predictions / "a.nii.gz")  # perfect
    full = (predictions / "a.nii.gz").read_bytes()
    (predictions / "b.nii.gz").write_bytes(full[: len(full) // 2])  # cut short
    return Setup(["--gt", str(labels), "--pred", str(predictions), "-o", str(root / "metrics.csv"), "--workers", "1"],
                 command="evaluation.run_metrics")


# ---------------------------------------------------------------------------- issue 31: silent wrong answers

def cache_env(root: Path) -> dict[str, str]:
    """A cache of exports and digests of the scenario's own: nothing of another scenario or run is reused."""
    return {"FLARE_ONNX_CACHE": str(root / "onnx-cache"), "FLARE_CACHE_DIR": str(root / "cache")}


def engine_once(args: list[str], env: dict[str, str] | None = None, command: str = "inference") -> None:
    """Run a command in a scenario's build (an earlier run); RuntimeError where it fails."""
    result = run_command(command, args, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"python -m {command} {' '.join(args)} failed in a scenario's build:\n{result.stderr}")


def read_mask(path: Path) -> np.ndarray:
    from inference.io import read_checked
    return sitk.GetArrayFromImage(read_checked(path))


def require_different(first: Path, second: Path) -> None:
    """A scenario about a changed model shows nothing unless the two models' masks differ."""
    if np.array_equal(read_mask(first), read_mask(second)):
        raise RuntimeError(f"{first} and {second} are the same mask: the scenario cannot tell the models apart")


def fresh_reference(root: Path, model: Path, inputs: Path, name: str) -> Path:
    """`model`'s masks of `inputs` from a run with a cache of its own (its own export), in root/name."""
    engine_once(engine_args(inputs, root / name, model), cache_env(root / f"{name}-cache"))
    return root / name


def swap_checkpoint(model: Path, other: Path) -> None:
    """Replace `model`'s checkpoint by `other`'s, keeping the size and the modification time (as `cp -p`, tar or a
    reproducible image build would leave them)."""
    checkpoint = model / "fold_all" / "checkpoint_final.pth"
    replacement = other / "fold_all" / "checkpoint_final.pth"
    if checkpoint.stat().st_size != replacement.stat().st_size:
        raise RuntimeError("the two toy checkpoints differ in size: the scenario would not be the one it names")
    stat = checkpoint.stat()
    shutil.copyfile(replacement, checkpoint)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def changed_after_run(change: Callable[[Path, Path], Path]) -> Callable[[Path, Reference], Setup]:
    """A run with `--backend auto` (which caches an export), then `change(model, root)` changes the model folder and
    returns a folder of the content it now holds; the same command again must write that content's masks."""
    def build(root: Path, ref: Reference) -> Setup:
        model = toy_model(root / "model", seed=1)
        with_good_case(root / "in", ref)
        env = cache_env(root)
        engine_once(engine_args(root / "in", root / "first", model), env)
        reference = fresh_reference(root, change(model, root), root / "in", "expected")
        require_different(root / "first" / "good.nii.gz", reference / "good.nii.gz")
        return Setup(loud(engine_args(root / "in", root / "out", model)), outputs=root / "out", env=env,
                     expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": reference / "good.nii.gz"})
    return build


def edit_leaky_relu_slope(model: Path, root: Path) -> Path:
    plans = json.loads((model / "plans.json").read_text())
    arch_kwargs(plans)["nonlin_kwargs"]["negative_slope"] = 0.3
    (model / "plans.json").write_text(json.dumps(plans))
    return model


def swap_in_another_checkpoint(model: Path, root: Path) -> Path:
    other = toy_model(root / "other", seed=2)
    swap_checkpoint(model, other)
    return other


def stale_folder_export(root: Path, ref: Reference) -> Setup:
    model, other = toy_model(root / "model", seed=1), toy_model(root / "other", seed=2)
    engine_once(["-m", str(model)], command="inference.export_onnx")  # fold_all/model.onnx
    swap_checkpoint(model, other)
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", root / "out", model, "--backend", "onnx"), outputs=root / "out",
                 env=cache_env(root))


def ray_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def ray_other_model(root: Path, ref: Reference) -> Setup:
    if not ray_installed():
        return Setup([], skip="ray is not installed (pip install '.[ray]')")
    first, second = toy_model(root / "first-model", seed=1), toy_model(root / "second-model", seed=2)
    with_good_case(root / "in", ref)
    env, journal = cache_env(root), str(root / "run.journal.jsonl")
    engine_once(engine_args(root / "in", root / "out", first, "--ray", "--journal", journal), env)
    reference = fresh_reference(root, second, root / "in", "second-masks")
    require_different(root / "out" / "good.nii.gz", reference / "good.nii.gz")
    args = loud(engine_args(root / "in", root / "out", second, "--ray", "--journal", journal))
    return Setup(args, outputs=root / "out", env=env, expected_outputs=["good.nii.gz"],
                 same_masks={"good.nii.gz": reference / "good.nii.gz"})


def skip_existing_broken(root: Path, ref: Reference) -> Setup:
    with_good_case(root / "in", ref)
    shutil.copy2(ref.good_image, root / "in" / "other_0000.nii.gz")
    (root / "out").mkdir()
    (root / "out" / "good.nii.gz").write_bytes(b"")  # 0 bytes
    cut = ref.good_mask.read_bytes()
    (root / "out" / "other.nii.gz").write_bytes(cut[: len(cut) // 2])  # cut short
    args = loud(engine_args(root / "in", root / "out", ref.model, "--skip-existing"))
    return Setup(args, outputs=root / "out", expected_outputs=["good.nii.gz", "other.nii.gz"],
                 same_masks={"good.nii.gz": ref.good_mask, "other.nii.gz": ref.good_mask})


def failed_over_earlier_mask(root: Path, ref: Reference) -> Setup:
    """A case that fails where an earlier run left its mask: no mask of it may stay."""
    setup = bogus_spacing((60.0, 60.0, 60.0))(root, ref)
    (root / "out").mkdir()
    shutil.copy2(ref.good_mask, root / "out" / "bogus.nii.gz")
    return setup


def sheared_mha(root: Path, ref: Reference) -> Setup:
    image = ct_image()
    image.SetDirection((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # the x and y axes 78.7 degrees apart
    write(image, root / "in" / "sheared_0000.mha")
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                 expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": ref.good_mask})


def with_flags(*flags: str) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        with_good_case(root / "in", ref)
        return Setup(engine_args(root / "in", root / "out", ref.model, *flags), outputs=root / "out")
    return build


def efficiency_rerun_fails(root: Path, ref: Reference) -> Setup:
    cases = root / "cases"
    with_good_case(cases, ref)
    copy = 'cp "$INPUT_DIR"/good_0000.nii.gz "$OUTPUT_DIR"/good.nii.gz'
    engine_once(["--cases", str(cases), "--command", copy, "--out", str(root / "eff"), "--no-gpu", "--no-plots"],
                command="evaluation.run_efficiency")
    return Setup(["--cases", str(cases), "--command", "exit 3", "--out", str(root / "eff"), "--no-gpu", "--no-plots"],
                 command="evaluation.run_efficiency", outputs=root / "eff" / "predictions")


def phantoms_out_reused(root: Path, ref: Reference) -> Setup:
    small = ["--shape", "24", "48", "48", "--spacing", "8", "8", "8", "--no-progress"]
    engine_once(["--out", str(root / "ph"), "--cases", "3", *small], command="phantoms")
    return Setup(["--out", str(root / "ph"), "--cases", "1", *small], command="phantoms",
                 outputs=root / "ph" / "images", expected_outputs=["phantom_0000_0000.nii.gz"])


LATIN1_NAME = os.fsdecode(b"caf\xe9")  # a file name that is not UTF-8, legal on Linux


def latin1_name(root: Path, ref: Reference) -> Setup:
    with_good_case(root / "in", ref)
    shutil.copy2(ref.good_image, root / "in" / f"{LATIN1_NAME}_0000.nii.gz")
    return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                 expected_outputs=[f"{LATIN1_NAME}.nii.gz", "good.nii.gz"],
                 same_masks={f"{LATIN1_NAME}.nii.gz": ref.good_mask, "good.nii.gz": ref.good_mask})


def metrics_latin1_name(root: Path, ref: Reference) -> Setup:
    for folder in ("labels", "pred"):
        (root / folder).mkdir()
        shutil.copy2(ref.good_mask, root / folder / f"{LATIN1_NAME}.nii.gz")
        shutil.copy2(ref.good_mask, root / folder / "good.nii.gz")
    (root / "m").mkdir()
    return Setup(["--gt", str(root / "labels"), "--pred", str(root / "pred"), "-o", str(root / "m" / "metrics.csv"),
                  "--workers", "1"], command="evaluation.run_metrics", outputs=root / "m",
                 expected_outputs=["metrics.csv", "metrics_summary.csv"])


def journal_under_read_only_parent(root: Path, ref: Reference) -> Setup:
    """`docker run --read-only` with a writable output mount: the journal's default place beside it is not."""
    parent = root / "ro"
    reason = mount_tmpfs(parent, "1m")
    if reason:
        return Setup([], skip=reason)
    (parent / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(parent)], check=True, capture_output=True, timeout=30)
    reason = mount_tmpfs(parent / "out", "4m")
    if reason:
        unmount(parent)
        return Setup([], skip=reason)
    with_good_case(root / "in", ref)

    def cleanup():
        unmount(parent / "out")
        unmount(parent)

    return Setup(engine_args(root / "in", parent / "out", ref.model, "--ray"), outputs=parent / "out",
                 cleanup=cleanup)


def fixed_patch_folder_export(root: Path, ref: Reference) -> Setup:
    model = root / "model"
    shutil.copytree(ref.model, model)
    engine_once(["-m", str(model), "--patch-size", "32", "32", "32"], command="inference.export_onnx")
    with_good_case(root / "in", ref)
    return Setup(loud(engine_args(root / "in", root / "out", model)), outputs=root / "out",
                 expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": ref.good_mask})


def header_bomb_bytes() -> bytes:
    """A NIfTI-1 header declaring 1000^3 int16 voxels, and 4 bytes of them, gzipped: under 100 bytes."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 1000, 1000, 1000, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 4, 16)  # int16
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    return gzip.compress(bytes(header) + b"\0" * 8)


def header_bomb(root: Path, ref: Reference) -> Setup:
    (root / "in").mkdir(parents=True)
    (root / "in" / "bomb_0000.nii.gz").write_bytes(header_bomb_bytes())
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", root / "out", ref.model), outputs=root / "out",
                 expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": ref.good_mask})


def metrics_header_bomb(root: Path, ref: Reference) -> Setup:
    for folder in ("labels", "pred"):
        (root / folder).mkdir()
        shutil.copy2(ref.good_mask, root / folder / "good.nii.gz")
    shutil.copy2(ref.good_mask, root / "labels" / "bomb.nii.gz")
    (root / "pred" / "bomb.nii.gz").write_bytes(header_bomb_bytes())
    return Setup(["--gt", str(root / "labels"), "--pred", str(root / "pred"), "-o", str(root / "metrics.csv"),
                  "--workers", "1"], command="evaluation.run_metrics")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_unreachable(root: Path, ref: Reference) -> Setup:
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", root / "out", ref.model, "--ray", f"127.0.0.1:{free_port()}"),
                 outputs=root / "out")


def ray_silent_address(root: Path, ref: Reference) -> Setup:
    """Something listens at the address, but it is not Ray: Ray itself would wait for minutes."""
    if not ray_installed():
        return Setup([], skip="ray is not installed (pip install '.[ray]')")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", root / "out", ref.model, "--ray",
                             f"127.0.0.1:{listener.getsockname()[1]}"), outputs=root / "out", cleanup=listener.close)


def ray_with(*flags: str) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        if not ray_installed():
            return Setup([], skip="ray is not installed (pip install '.[ray]')")
        with_good_case(root / "in", ref)
        return Setup(engine_args(root / "in", root / "out", ref.model, "--ray", *flags), outputs=root / "out")
    return build


def tiny_step(root: Path, ref: Reference) -> Setup:
    write(ct_image(shape_zyx=(60, 160, 160)), root / "in" / "large_0000.nii.gz")
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", root / "out", ref.model, "--step-size", "1e-6"), outputs=root / "out",
                 expected_outputs=["good.nii.gz"], same_masks={"good.nii.gz": ref.good_mask})


def ray_interrupted(root: Path, ref: Reference) -> Setup:
    if not ray_installed():
        return Setup([], skip="ray is not installed (pip install '.[ray]')")
    write(ct_image(shape_zyx=(60, 160, 160)), root / "in" / "large_0000.nii.gz")
    # a step of 0.05 makes thousands of windows: the worker is still in the network when the run is stopped
    args = loud(engine_args(root / "in", root / "out", ref.model, "--ray", "--step-size", "0.05"))
    return Setup(args, outputs=root / "out", interrupt_after="ray: ")


def timings_folder_missing(root: Path, ref: Reference) -> Setup:
    with_good_case(root / "in", ref)
    return Setup(engine_args(root / "in", root / "out", ref.model, "--timings", str(root / "nowhere" / "t.json")),
                 outputs=root / "out")


def metrics_output_is_a_folder(root: Path, ref: Reference) -> Setup:
    for folder in ("labels", "pred"):
        (root / folder).mkdir()
        shutil.copy2(ref.good_mask, root / folder / "good.nii.gz")
    (root / "metrics.csv").mkdir()
    return Setup(["--gt", str(root / "labels"), "--pred", str(root / "pred"), "-o", str(root / "metrics.csv"),
                  "--workers", "1"], command="evaluation.run_metrics")


def metrics_overlays_broken(root: Path, ref: Reference) -> Setup:
    setup = broken_prediction(root, ref)
    for case in ("a", "b"):  # the CT images the pictures are drawn on
        write(ct_image(), root / "images" / f"{case}_0000.nii.gz")
    write(ct_image(), root / "images" / "c_0000.nii.gz")
    write(sitk.GetImageFromArray(np.zeros((16, 40, 40), np.uint8)), root / "labels" / "c.nii.gz")
    wrong = sitk.GetImageFromArray(np.zeros((8, 20, 20), np.uint8))  # of another grid than its truth
    write(wrong, root / "pred" / "c.nii.gz")
    setup.args += ["--overlays", str(root / "pictures"), "--images", str(root / "images")]
    setup.outputs, setup.expected_outputs = root / "pictures", ["a.png", "b.png", "c.png", "overview.png"]
    return setup


def same_folder_rerun(root: Path, ref: Reference) -> Setup:
    folder = root / "data"
    with_good_case(folder, ref)
    engine_once(engine_args(folder, folder, ref.model))
    args = loud(engine_args(folder, folder, ref.model, "--skip-existing"))
    return Setup(args, outputs=folder, expected_outputs=["good.nii.gz", "good_0000.nii.gz"],
                 same_masks={"good.nii.gz": ref.good_mask})


def phantoms_flags(*flags: str) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        return Setup(["--out", str(root / "ph"), *flags], command="phantoms", outputs=root / "ph")
    return build


SCENARIOS = [
    # 1. code from a model folder
    Scenario("plans-names-a-function", "1. code from a model folder",
             "plans.json's `nonlin` names an import helper function (torch's lazy_deprecated_import)",
             hostile(HOSTILE_NONLIN),
             2, [r"plans\.json: nonlin: refusing .*not a torch\.nn\.Module class"], error_lines=1),
    Scenario("plans-name-import-module", "1. code from a model folder",
             "`nonlin` is `importlib.import_module` with `nonlin_kwargs` naming the folder's `evil.py`",
             hostile(IMPORTS_BY_NAME), 2, [r"plans\.json: nonlin: refusing 'importlib\.import_module'"],
             error_lines=1),
    Scenario("plans-names-a-module", "1. code from a model folder",
             "`conv_op` names a module (`torch.nn.functional.importlib`)",
             hostile(set_op("conv_op", "torch.nn.functional.importlib")),
             2, [r"plans\.json: conv_op: refusing 'torch\.nn\.functional\.importlib'"], error_lines=1),
    Scenario("plans-names-os", "1. code from a model folder",
             "`dropout_op` names `os` through a module attribute (`torch.nn.parallel.distributed.os`)",
             hostile(set_op("dropout_op", "torch.nn.parallel.distributed.os", {})),
             2, [r"plans\.json: dropout_op: refusing"], error_lines=1),
    Scenario("plans-walks-to-os-system", "1. code from a model folder",
             "`norm_op` walks through a module attribute to a function (`...distributed.os.system`)",
             hostile(set_op("norm_op", "torch.nn.parallel.distributed.os.system")),
             2, [r"plans\.json: norm_op: cannot import"], error_lines=1),
    Scenario("plans-names-builtins", "1. code from a model folder",
             "`network_class_name` is a builtin (`builtins.exec`)",
             hostile(set_network_class("builtins.exec")),
             2, [r"plans\.json: network_class_name: refusing 'builtins\.exec'"], error_lines=1),
    Scenario("plans-names-model-folder-code", "1. code from a model folder",
             "`network_class_name` names code shipped in the model folder (`model.evil.Net`)",
             hostile(set_network_class("model.evil.Net")),
             2, [r"plans\.json: network_class_name: refusing"], error_lines=1),
    Scenario("export-onnx-hostile-plans", "1. code from a model folder",
             "`python -m inference.export_onnx` on a model folder whose plans name an import helper",
             hostile_export, 2, [r"plans\.json: nonlin: refusing"], error_lines=1),
    # 2. write errors
    Scenario("disk-full", "2. a full disk",
             "the output folder on a 256 KB tmpfs filled to the last byte", full_disk,
             1, [r"good\.nii\.gz: (the mask was not written completely|cannot write the mask)",
                 r"1 of 1 case\(s\) failed"], error_lines=2),
    # 3. non-finite voxels
    Scenario("nan-voxels", "3. NaN / inf voxels",
             "a float .mha with a block of NaN voxels and one +inf", nan_block,
             0, [r"nan_0000\.mha: 49 NaN or infinite voxel\(s\) set to the lowest finite value"], error_lines=0),
    # 4. name collisions
    Scenario("collision-suffixes", "4. name collisions", "`a_0000.nii.gz` and `a_0000.mha` in one folder",
             collision(["a_0000.nii.gz", "a_0000.mha"]), 2, [r"would both be written to .*a\.nii\.gz"],
             error_lines=1),
    Scenario("collision-channel", "4. name collisions", "`a.nii.gz` and `a_0000.nii.gz` in one folder",
             collision(["a.nii.gz", "a_0000.nii.gz"]), 2, [r"would both be written to .*a\.nii\.gz"],
             error_lines=1),
    Scenario("mask-replaces-input", "4. name collisions",
             "input and output the same folder, an input without `_0000`", mask_replaces_input,
             2, [r"scan\.nii\.gz: the mask of scan\.nii\.gz would replace an input image"], error_lines=1),
    # 5. vanishing cases
    Scenario("dangling-link", "5. cases that vanish", "a symbolic link to a deleted file beside a good case",
             dangling_link, 1, [r"gone_0000\.nii\.gz: dangling symbolic link", r"1 of 2 case\(s\) failed"],
             error_lines=2),
    Scenario("upper-case-suffix", "5. cases that vanish", "`GOOD_0000.NII.GZ` (upper-case suffix)",
             upper_case_suffix, 0, [], error_lines=0),
    Scenario("empty-input", "5. cases that vanish", "an input folder with no image (a `notes.txt` only)",
             empty_input, 2, [r"in: no case in it"], error_lines=1),
    # 6. interrupted runs
    Scenario("sigterm", "6. SIGTERM and leftovers",
             "SIGTERM during the network (`docker stop`); a partial folder a killed run left an hour ago",
             interrupted, 143, [r"stopped by SIGTERM after 0 case\(s\); no partial mask left"], error_lines=1),
    Scenario("sigterm-while-writing", "6. SIGTERM and leftovers",
             "SIGTERM the moment a mask is being written (the writer thread), four cases", interrupted_while_writing,
             143, [r"stopped by SIGTERM after \d case\(s\); no partial mask left",
                   r"case\d: written \(it was being written when the run was stopped\)"], error_lines=1),
    # 7. one line instead of a traceback
    Scenario("output-is-a-file", "7. tracebacks", "`-o` names an existing file", output_is_a_file,
             2, [r"out: output folder cannot be written"], error_lines=1),
    Scenario("output-under-a-file", "7. tracebacks", "`-o` lies under a file", output_under_a_file,
             2, [r"output folder cannot be written"], error_lines=1),
    Scenario("plans-missing-spacing", "7. tracebacks", "plans.json without the configuration's `spacing`",
             malformed(lambda plans, dataset: plans["configurations"]["3d_fullres"].pop("spacing")),
             2, [r"plans\.json: 'configurations\.3d_fullres\.spacing' is missing"], error_lines=1),
    Scenario("plans-configurations-list", "7. tracebacks", "plans.json's `configurations` is a list",
             malformed(lambda plans, dataset: plans.__setitem__("configurations", [1, 2])),
             2, [r"plans\.json: 'configurations' must be an object, got list"], error_lines=1),
    Scenario("plans-patch-strings", "7. tracebacks", "`patch_size` holds strings",
             malformed(lambda plans, dataset: plans["configurations"]["3d_fullres"].__setitem__(
                 "patch_size", ["32", "32", "32"])),
             2, [r"'configurations\.3d_fullres\.patch_size' must be a non-empty list of integers"],
             error_lines=1),
    Scenario("dataset-labels-list", "7. tracebacks", "dataset.json's `labels` is a list",
             malformed(lambda plans, dataset: dataset.__setitem__("labels", ["background", "lesion"])),
             2, [r"dataset\.json: 'labels' must be an object, got list"], error_lines=1),
    Scenario("intensities-missing", "7. tracebacks", "plans.json without the CT intensity statistics",
             malformed(lambda plans, dataset: plans.pop("foreground_intensity_properties_per_channel")),
             2, [r"plans\.json: 'foreground_intensity_properties_per_channel\.0\.mean' is missing"],
             error_lines=1),
    # 8. bogus headers
    Scenario("voxels-60mm", "8. unbounded work", "a 5 KB image with 60 mm voxels, beside a good case",
             bogus_spacing((60.0, 60.0, 60.0)), 1,
             [r"bogus_0000\.nii\.gz: voxels of .* would be up-sampled 8,000x", r"1 of 2 case\(s\) failed"],
             error_lines=2),
    Scenario("spacing-in-micrometres", "8. unbounded work",
             "a 16^3 image whose header gives its 0.8 mm voxels as 800 (micrometres), beside a good case",
             bogus_spacing((800.0, 800.0, 800.0), (16, 16, 16)), 1,
             [r"bogus_0000\.nii\.gz: .* voxels at the model's spacing \(about [\d,]+ GB\), over the limit"],
             error_lines=2),
    Scenario("on-error-empty", "challenge mode",
             "the 60 mm case again, with `--on-error empty`", on_error_empty, 1,
             [r"bogus_0000\.nii\.gz: wrote an empty mask bogus\.nii\.gz \(--on-error empty\)",
              r"1 of 2 case\(s\) failed"], error_lines=2),
    # 9. geometry
    Scenario("skewed-sform", "9. geometry changed silently", "a NIfTI whose sform axes are not perpendicular",
             skewed_sform, 0, [r"skewed_0000\.nii\.gz: the header's sform axes are not perpendicular"],
             error_lines=0),
    # 10. valid files
    Scenario("gzip-members", "10. valid files refused", "a .nii.gz of two gzip members (bgzip-style)",
             regzipped("members"), 0, [], error_lines=0),
    Scenario("gzip-padding", "10. valid files refused", "a .nii.gz with zero padding after the gzip stream",
             regzipped("padding"), 0, [], error_lines=0),
    # 11. metrics
    Scenario("metrics-broken-prediction", "11. run_metrics and broken predictions",
             "`run_metrics` with one perfect and one cut-short prediction", broken_prediction,
             1, [r"b\.nii\.gz: (cannot read image|truncated or corrupt NIfTI)"], error_lines=1),
    # 12. slow to fail
    Scenario("read-only-output", "12. slow to fail", "a read-only output folder (a read-only tmpfs)",
             read_only_output, 2, [r"out: output folder cannot be written \(Read-only file system\)"],
             error_lines=1),
    # issue 31: silent wrong or stale results
    Scenario("plans-edited-after-run", "13. stale exports (31.1)",
             "`plans.json` edited after a run (the LeakyReLU slope); the same command again, `--backend auto` on the CPU",
             changed_after_run(edit_leaky_relu_slope), 0, [r"exported fold all to .*model\.onnx for ONNX Runtime on the CPU"],
             error_lines=0),
    Scenario("checkpoint-swapped", "13. stale exports (31.1)",
             "the checkpoint replaced by another of the same size and modification time (`cp -p`); the same command "
             "again", changed_after_run(swap_in_another_checkpoint), 0, [r"exported fold all to .*model\.onnx for ONNX Runtime on the CPU"],
             error_lines=0),
    Scenario("stale-folder-export", "13. stale exports (31.1)",
             "`--backend onnx` with a `fold_all/model.onnx` exported from the checkpoint before it was replaced",
             stale_folder_export, 2,
             [r"fold_all/model\.onnx: not used: it was exported from another checkpoint_final\.pth"], error_lines=1),
    Scenario("ray-other-model", "14. resumed runs (31.2)",
             "`--ray` into an output folder, then the same command with `-m OTHER`", ray_other_model, 0,
             [r"1 case\(s\) it records as done run again: made by another model"], error_lines=0),
    Scenario("skip-existing-broken-masks", "14. resumed runs (31.3)",
             "`--skip-existing` over a 0-byte mask and a cut-short one", skip_existing_broken, 0,
             [r"good\.nii\.gz: computed again \(--skip-existing\): the mask there is an empty file",
              r"other\.nii\.gz: computed again \(--skip-existing\): the mask there is unreadable"], error_lines=0),
    Scenario("failed-over-earlier-mask", "14. resumed runs (31.3)",
             "the 60 mm case again, where an earlier run left a mask `bogus.nii.gz`", failed_over_earlier_mask, 1,
             [r"bogus_0000\.nii\.gz: voxels of .* \(removed bogus\.nii\.gz, an earlier run's mask\)"],
             error_lines=2),
    Scenario("sheared-mha", "9. geometry changed silently (31.4)",
             "an .mha whose direction matrix is not orthogonal (axes 78.7 degrees apart), beside a good case",
             sheared_mha, 1, [r"sheared_0000\.mha: its direction matrix is not orthonormal \(axes 78\.7 degrees apart"],
             error_lines=2),
    Scenario("flag-probability-50", "15. flags (31.5)", "`--min-lesion-probability 50`",
             with_flags("--min-lesion-probability", "50"), 2,
             [r"^error: argument --min-lesion-probability: must be within \[0, 1\], got 50"], error_lines=1),
    Scenario("flag-min-ml-nan", "15. flags (31.5)", "`--min-lesion-ml nan`", with_flags("--min-lesion-ml", "nan"), 2,
             [r"^error: argument --min-lesion-ml: must be >= 0, got nan"], error_lines=1),
    Scenario("flag-step-0", "15. flags (31.5)", "`--step-size 0`", with_flags("--step-size", "0"), 2,
             [r"^error: argument -step_size/--step-size: must be within \(0, 1\], got 0"], error_lines=1),
    Scenario("flag-patch-not-stride", "15. flags (31.5)", "`--patch-size 30 32 32` (the network's stride is 4)",
             with_flags("--patch-size", "30", "32", "32"), 2,
             [r"--patch-size 30x32x32: must be a multiple of the network's total stride 4x4x4"], error_lines=1),
    Scenario("efficiency-rerun-fails", "16. stale files (31.6)",
             "`run_efficiency` into the same `--out` again, the command now failing", efficiency_rerun_fails, 1,
             [r"removed \d+ file\(s\) of an earlier run", r"good_0000\.nii\.gz: nonzero_exit"]),
    Scenario("phantoms-out-reused", "16. stale files (31.6)", "`phantoms --out` reused with 1 case instead of 3",
             phantoms_out_reused, 0, []),
    # issue 31: crashes that lose other cases' work
    Scenario("latin1-name", "17. one case, never the batch (31.7)",
             "a latin-1 file name `caf\\xe9_0000.nii.gz` (not UTF-8) beside a good case", latin1_name, 0, [],
             error_lines=0),
    Scenario("metrics-latin1-name", "17. one case, never the batch (31.7)",
             "`run_metrics` with a latin-1 case name", metrics_latin1_name, 0, [], error_lines=0),
    Scenario("journal-read-only-parent", "12. slow to fail (31.8)",
             "`--ray`, a writable output folder under a read-only parent (the journal's default place)",
             journal_under_read_only_parent, 2,
             [r"out\.journal\.jsonl: the --ray journal \(--journal\): the folder .* cannot be written "
              r"\(Read-only file system\)"], error_lines=1),
    Scenario("fixed-patch-folder-export", "17. one case, never the batch (31.9)",
             "the model folder's own export fixed to one patch (`export_onnx --patch-size 32 32 32`), default run",
             fixed_patch_folder_export, 0,
             [r"fold_all/model\.onnx not used: it takes only the 32x32x32 patch it was exported for"], error_lines=0),
    # issue 31: unbounded memory or time, hangs
    Scenario("header-bomb", "8. unbounded work (31.10)",
             "a 54-byte .nii.gz whose header declares 1000^3 voxels, beside a good case", header_bomb, 1,
             [r"bomb_0000\.nii\.gz: its header declares 1000x1000x1000 voxels \(2,000 MB\), more than its \d+ bytes"],
             error_lines=2, max_seconds=60),
    Scenario("metrics-header-bomb", "8. unbounded work (31.10)", "`run_metrics` with that file as a prediction",
             metrics_header_bomb, 1, [r"bomb\.nii\.gz: its header declares 1000x1000x1000 voxels"], error_lines=1,
             max_seconds=60),
    Scenario("ray-unreachable", "8. unbounded work (31.11)", "`--ray 127.0.0.1:PORT` where nothing listens",
             ray_unreachable, 2, [r"--ray 127\.0\.0\.1:\d+: no Ray cluster answers there"], error_lines=1,
             max_seconds=30),
    Scenario("ray-silent-address", "8. unbounded work (31.11)",
             "`--ray 127.0.0.1:PORT` where something listens that is not Ray", ray_silent_address, 2,
             [r"--ray 127\.0\.0\.1:\d+: Ray did not start within 30 s"], error_lines=1, max_seconds=60),
    Scenario("ray-cpus-above-cores", "8. unbounded work (31.12)", "`--ray --ray-cpus 512` on a 2-core machine",
             ray_with("--ray-cpus", "512"), 2, [r"--ray-cpus 512: no node of the cluster has that many cores"],
             error_lines=1, max_seconds=60),
    Scenario("step-tiny", "8. unbounded work (31.13)", "`--step-size 1e-6` on a 60x160x160 case, beside a small one",
             tiny_step, 1, [r"large_0000\.nii\.gz: step 1e-06 of the .* patch would make [\d,]+ windows .* over the "
                            r"limit of 200,000"], error_lines=2, max_seconds=60),
    Scenario("ray-sigterm", "6. SIGTERM and leftovers (31.14)", "SIGTERM during the network under `--ray`",
             ray_interrupted, 143, [r"stopped by SIGTERM after 0 case\(s\); no partial mask left"], error_lines=1),
    # issue 31: tracebacks or wrong exits
    Scenario("checkpoint-missing", "7. tracebacks (31.15)", "`-chk checkpoint_best.pth`, which the fold does not have",
             with_flags("-chk", "checkpoint_best.pth"), 2,
             [r"fold_all/checkpoint_best\.pth: checkpoint not found \(-chk; fold_all has checkpoint_final\.pth\)"],
             error_lines=1),
    Scenario("timings-folder-missing", "7. tracebacks (31.16)", "`--timings` into a folder that does not exist",
             timings_folder_missing, 2, [r"t\.json: --timings: the folder .*nowhere does not exist"], error_lines=1),
    Scenario("metrics-output-is-a-folder", "7. tracebacks (31.17)", "`run_metrics -o` naming an existing folder",
             metrics_output_is_a_folder, 2, [r"metrics\.csv: -o names a folder, not a file"], error_lines=1),
    Scenario("metrics-overlays-broken", "7. tracebacks (31.17)",
             "`run_metrics --overlays` with a cut-short prediction and one on another grid", metrics_overlays_broken, 1,
             [r"b\.nii\.gz: (cannot read image|truncated or corrupt NIfTI)", r"c\.nii\.gz: geometry differs"], error_lines=2),
    Scenario("same-folder-rerun", "4. name collisions (31.18)",
             "`-i` and `-o` the same folder of `_0000` inputs, the identical command again with `--skip-existing`",
             same_folder_rerun, 0, [r"skipped: .*good\.nii\.gz: the mask of good_0000 from an earlier run"],
             error_lines=0),
    Scenario("phantoms-negative-seed", "7. tracebacks (31.19)", "`phantoms --seed -1`",
             phantoms_flags("--seed", "-1"), 2, [r"^error: argument --seed: must be >= 0, got -1"], error_lines=1),
    Scenario("phantoms-nan-spacing", "7. tracebacks (31.19)", "`phantoms --spacing nan 1 1`",
             phantoms_flags("--spacing", "nan", "1", "1"), 2, [r"^error: argument --spacing: must be > 0, got nan"],
             error_lines=1),
]


# ---------------------------------------------------------------------------------------------- running

@dataclass
class Outcome:
    scenario: Scenario
    skipped: str | None = None
    returncode: int | None = None
    stderr: str = ""
    seconds: float | None = None
    outputs: list[str] | None = None
    problems: list[str] = field(default_factory=list)


def run_command(command: str, args: list[str], interrupt_after: str | None = None,
                env: dict[str, str] | None = None, interrupt_on_partial: Path | None = None
                ) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", command, *args]
    environment = {**os.environ, **(env or {})}
    if interrupt_on_partial is not None:
        return run_until_partial(argv, environment, interrupt_on_partial)
    if interrupt_after is None:
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=environment,
                              errors="backslashreplace")
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment, errors="backslashreplace")
    lines = []
    for line in process.stderr:  # until the text appears, then stop it as `docker stop` would
        lines.append(line)
        if interrupt_after in line:
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            break
    rest_out, rest_err = process.communicate(timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(argv, process.returncode, rest_out, "".join(lines) + rest_err)


def mask_being_written(folder: Path) -> bool:
    """Whether a partial folder of the engine holds a file: a mask being written (the output folder's write check,
    made when the run starts, is an empty one)."""
    try:
        return any(any(partial.iterdir()) for partial in folder.glob(".flare-partial-*"))
    except OSError:  # renamed into place or removed while looked at
        return False


def run_until_partial(argv: list[str], environment: dict[str, str], folder: Path) -> subprocess.CompletedProcess:
    """Run, and send SIGTERM the moment a partial mask (the engine's hidden `.flare-partial-*` folder) exists in
    `folder`: a stop while a mask is being written, on the CLI's writer thread."""
    with tempfile.TemporaryFile("w+", errors="backslashreplace") as stderr:
        process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, env=environment)
        deadline = time.time() + RUN_TIMEOUT_S
        while process.poll() is None and time.time() < deadline:
            if mask_being_written(folder):
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.002)
        process.wait(timeout=RUN_TIMEOUT_S)
        stderr.seek(0)
        return subprocess.CompletedProcess(argv, process.returncode, "", stderr.read())


def run_scenario(scenario: Scenario, root: Path, ref: Reference) -> Outcome:
    root.mkdir(parents=True, exist_ok=True)
    setup = scenario.build(root, ref)
    outcome = Outcome(scenario)
    if setup.skip:
        outcome.skipped = setup.skip
        return outcome
    try:
        started = time.perf_counter()
        result = run_command(setup.command, setup.args, setup.interrupt_after, setup.env, setup.interrupt_on_partial)
        outcome.seconds = time.perf_counter() - started
        outcome.returncode, outcome.stderr = result.returncode, result.stderr
        if setup.outputs is not None:
            outcome.outputs = sorted(p.name for p in setup.outputs.iterdir()) if setup.outputs.is_dir() else []
        outcome.problems = check(scenario, setup, outcome)
    finally:
        if setup.cleanup:
            setup.cleanup()
    return outcome


def check(scenario: Scenario, setup: Setup, outcome: Outcome) -> list[str]:
    """What went wrong against the scenario's expectations (empty: all as expected)."""
    problems = []
    stderr = outcome.stderr
    if outcome.returncode != scenario.exit_code:
        problems.append(f"exit code {outcome.returncode}, expected {scenario.exit_code}")
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    if "*** SIG" in stderr or "Fatal Python error" in stderr:
        problems.append("a crash report (a C++ or Python stack dump) on stderr")
    if scenario.max_seconds is not None and outcome.seconds > scenario.max_seconds:
        problems.append(f"took {outcome.seconds:.1f} s, over {scenario.max_seconds:g} s")
    lines = stderr.splitlines()
    for pattern in scenario.says:
        if not any(re.search(pattern, line) for line in lines):
            problems.append(f"no line matching {pattern!r}")
    errors = [line for line in lines if line.startswith("error")]
    if scenario.error_lines is not None and len(errors) != scenario.error_lines:
        problems.append(f"{len(errors)} error line(s), expected {scenario.error_lines}: {errors}")
    if any(line.startswith(("WARNING: In ", "ERROR: In ")) for line in lines):
        problems.append("ITK's multi-line message on stderr")
    if setup.whole_masks_of is not None:
        problems += whole_masks_problems(setup, outcome)
    elif setup.outputs is not None and outcome.outputs != sorted(setup.expected_outputs):
        problems.append(f"output folder holds {outcome.outputs}, expected {sorted(setup.expected_outputs)}")
    for name, reference in setup.same_masks.items():
        path = setup.outputs / name
        if path.is_file() and not np.array_equal(read_mask(path), read_mask(reference)):
            problems.append(f"{name} differs from the mask of the same case run alone")
    for folder in setup.marker_dirs:
        if (folder / MARKER).exists():
            problems.append(f"code from the model folder ran ({folder / MARKER})")
    return problems


def whole_masks_problems(setup: Setup, outcome: Outcome) -> list[str]:
    """A run stopped in the middle: every file left is a whole mask, and some case is left undone."""
    from inference.errors import CaseError
    problems = []
    if len(outcome.outputs) >= setup.whole_masks_of:
        problems.append(f"all {setup.whole_masks_of} masks written: the run was not stopped in the middle")
    for name in outcome.outputs:
        try:
            if not name.endswith(".nii.gz"):
                raise CaseError("not a mask")
            read_mask(setup.outputs / name)
        except CaseError as error:
            problems.append(f"{name} left in the output folder: {error}")
    return problems


def first_line(outcome: Outcome, root: Path) -> str:
    """The engine's most telling stderr line (the first the scenario expects, else its first error, warning or
    skipped line), paths shortened to the scenario's folder."""
    lines = outcome.stderr.splitlines()
    expected = [line for line in lines if outcome.scenario.says and re.search(outcome.scenario.says[0], line)]
    lines = expected or [line for line in lines if line.startswith(("error", "warning", "skipped"))]
    chosen = lines[0] if lines else "(no warning, no error)"
    for folder in (root, root.parent, REPO):
        chosen = chosen.replace(str(folder) + "/", "")
    return chosen


def shown(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (a latin-1 name) as escapes, \\xe9."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def table(outcomes: list[tuple[Outcome, Path]]) -> str:
    rows = ["# Robustness: input or fault → behaviour", "",
            "Generated by `.venv/bin/python -m tests.robustness.corpus --table docs/robustness.md` from a run of",
            "every scenario (`tests/robustness/corpus.py`; `tests/robustness/test_robustness.py` asserts the same).",
            "Each row is a fresh process of the real command. Checked for every row: the exit code, the line",
            "quoted, no traceback, no multi-line ITK message, the exact files left in the output folder (no partial",
            "or stray file), the other cases' masks identical to the same case run alone, and no marker file from",
            "code in a model folder.", "",
            "| class | input or fault | exit | what it says (first line) | output folder afterwards | checks |",
            "|---|---|---|---|---|---|"]
    for outcome, root in outcomes:
        scenario = outcome.scenario
        if outcome.skipped:
            rows.append(f"| {scenario.defect} | {scenario.fault} | - | skipped here: {outcome.skipped} | - | - |")
            continue
        outputs = "-" if outcome.outputs is None else (", ".join(f"`{shown(o)}`" for o in outcome.outputs) or "empty")
        verdict = "pass" if not outcome.problems else "FAIL: " + "; ".join(outcome.problems)
        message = first_line(outcome, root).replace("|", "\\|")
        rows.append(f"| {scenario.defect} | {scenario.fault} | {outcome.returncode} | `{message}` | {outputs} | "
                    f"{verdict} |")
    rows += ["", "Beyond the table (in-process tests in `tests/robustness/test_robustness.py` and "
             "`tests/test_out_of_memory.py`):", "",
             "- NaN voxels: the mask away from the repaired block is identical to the mask of the clean image "
             "(a voxel-wise network).",
             "- A write interrupted after the partial file exists, and a write that ITK cuts short without an "
             "error, leave nothing in the output folder; the second is a failed case.",
             "- Out of GPU memory: logits accumulated on the CPU, then a smaller patch, then the network on the "
             "CPU, each taken when the error is injected at the step before, with a warning; at every step: "
             "the error.",
             "- `--time-budget SECONDS`: when windows x the measured time of one overrun what is left of the "
             "budget, the step grows (0.75, then 1.0) and a warning says so.",
             "- `evaluation.run_efficiency`: a process a run leaves behind in a session of its own (a double "
             "fork) is killed at the end of the run (the harness is a child subreaper), also after a timeout.",
             "- Fingerprints (`tests/test_fingerprints.py`): a file's digest follows its bytes, not its size and "
             "modification time (another checkpoint of the same size and mtime, as `cp -p` leaves it, gets another; "
             "a touched one keeps it); a digest is remembered only by a file's identity with its change time, never "
             "for a file changed within the last second; the model fingerprint changes with `plans.json`, "
             "`dataset.json`, a checkpoint and `lesion_filter.json`, the run fingerprint with every setting that "
             "changes a mask (and not with `--verbose`); a mask's note reads back from its header, and a mask of "
             "another run, of a replaced input or off the input's grid is not reused.",
             "- `--skip-existing` (`tests/test_scale_out.py`, in one process and under `--ray`): a mask of unknown "
             "origin, a 0-byte file and a failed case's empty mask (`--on-error empty`) are computed again; a mask "
             "this run made is kept, untouched.",
             "- A written mask is read back and its grid compared with the input's: an oblique (rotated, "
             "orthonormal) grid passes, a sheared one is refused and leaves nothing behind."]
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="build the corpus here (default: a temporary folder)")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--only", nargs="+", default=None, help="scenario names")
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="robustness_"))
    torch.manual_seed(0)
    ref = make_reference(root)
    outcomes = []
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        folder = root / scenario.name
        outcome = run_scenario(scenario, folder, ref)
        outcomes.append((outcome, folder))
        state = "skipped" if outcome.skipped else ("ok" if not outcome.problems else "FAILED")
        print(f"{scenario.name}: {state}" + (f": {outcome.problems}" if outcome.problems else ""), flush=True)
    if args.table:
        args.table.write_text(table(outcomes))
        print(f"wrote {args.table}")
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(outcome.problems for outcome, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
