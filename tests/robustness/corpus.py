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

from inference.model.folder import (SYNTHETIC_CT_INTENSITIES, make_dataset_json, make_plans,
                                    plain_unet_arch_kwargs, write_random_model_folder)

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
MARKER = "CODE_RAN"  # written by the hostile model folder's Python file if it is ever imported


# ------------------------------------------------------------------------------------------ ingredients

def toy_model(folder: Path) -> Path:
    """A small 3-stage U-Net model folder (random weights, 3 mm, 32^3 patch)."""
    arch = plain_unet_arch_kwargs(n_stages=3, base_features=4)
    plans = make_plans(spacing=[3.0, 3.0, 3.0], patch_size=[32, 32, 32], arch_kwargs=arch,
                       intensity_properties=SYNTHETIC_CT_INTENSITIES)
    return write_random_model_folder(folder, plans, make_dataset_json())


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


@dataclass
class Scenario:
    name: str
    defect: str            # the class of defect, as issue 21 numbers them
    fault: str             # the input or fault, for the table
    build: Callable[[Path, "Reference"], Setup]
    exit_code: int
    says: list[str]        # substrings of stderr (regular expressions), in one line each
    error_lines: int | None = None  # number of stderr lines starting with "error" (None: not checked)


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


def with_good_case(folder: Path, ref: Reference) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ref.good_image, folder / ref.good_image.name)


def hostile(edit: Callable[[dict], None]) -> Callable[[Path, Reference], Setup]:
    def build(root: Path, ref: Reference) -> Setup:
        model = hostile_model(root, edit)
        with_good_case(root / "in", ref)
        return Setup(engine_args(root / "in", root / "out", model), outputs=root / "out",
                     marker_dirs=[model, REPO])
    return build


def hostile_export(root: Path, ref: Reference) -> Setup:
    model = hostile_model(root, set_op("nonlin", "torch.nn.utils._deprecation_utils.lazy_deprecated_import",
                                       {"all": ["x"], "old_module": "a", "new_module": "evil"}))
    return Setup(["-m", str(model)], command="inference.export_onnx", marker_dirs=[model, REPO])


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
    args = [a for a in engine_args(root / "in", out, ref.model, "--step-size", "0.05") if a != "--quiet"]
    return Setup(args, outputs=out, expected_outputs=[".flare-partial-live"], interrupt_after="loaded in")


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


SCENARIOS = [
    # 1. code from a model folder
    Scenario("plans-names-a-function", "1. code from a model folder",
             "plans.json's `nonlin` names an import helper function (torch's lazy_deprecated_import)",
             hostile(set_op("nonlin", "torch.nn.utils._deprecation_utils.lazy_deprecated_import",
                            {"all": ["x"], "old_module": "a", "new_module": "evil"})),
             2, [r"plans\.json: nonlin: refusing .*not a torch\.nn\.Module class"], error_lines=1),
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
             1, [r"b\.nii\.gz: (cannot be read|truncated or corrupt NIfTI)"], error_lines=1),
    # 12. slow to fail
    Scenario("read-only-output", "12. slow to fail", "a read-only output folder (a read-only tmpfs)",
             read_only_output, 2, [r"out: output folder cannot be written \(Read-only file system\)"],
             error_lines=1),
]


# ---------------------------------------------------------------------------------------------- running

@dataclass
class Outcome:
    scenario: Scenario
    skipped: str | None = None
    returncode: int | None = None
    stderr: str = ""
    outputs: list[str] | None = None
    problems: list[str] = field(default_factory=list)


def run_command(command: str, args: list[str], interrupt_after: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", command, *args]
    if interrupt_after is None:
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # until the text appears, then stop it as `docker stop` would
        lines.append(line)
        if interrupt_after in line:
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            break
    rest_out, rest_err = process.communicate(timeout=RUN_TIMEOUT_S)
    return subprocess.CompletedProcess(argv, process.returncode, rest_out, "".join(lines) + rest_err)


def run_scenario(scenario: Scenario, root: Path, ref: Reference) -> Outcome:
    root.mkdir(parents=True, exist_ok=True)
    setup = scenario.build(root, ref)
    outcome = Outcome(scenario)
    if setup.skip:
        outcome.skipped = setup.skip
        return outcome
    try:
        result = run_command(setup.command, setup.args, setup.interrupt_after)
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
    lines = stderr.splitlines()
    for pattern in scenario.says:
        if not any(re.search(pattern, line) for line in lines):
            problems.append(f"no line matching {pattern!r}")
    errors = [line for line in lines if line.startswith("error")]
    if scenario.error_lines is not None and len(errors) != scenario.error_lines:
        problems.append(f"{len(errors)} error line(s), expected {scenario.error_lines}: {errors}")
    if any(line.startswith(("WARNING: In ", "ERROR: In ")) for line in lines):
        problems.append("ITK's multi-line message on stderr")
    if setup.outputs is not None and outcome.outputs != sorted(setup.expected_outputs):
        problems.append(f"output folder holds {outcome.outputs}, expected {sorted(setup.expected_outputs)}")
    for name, reference in setup.same_masks.items():
        path = setup.outputs / name
        if path.is_file() and not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
                                                  sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))):
            problems.append(f"{name} differs from the mask of the same case run alone")
    for folder in setup.marker_dirs:
        if (folder / MARKER).exists():
            problems.append(f"code from the model folder ran ({folder / MARKER})")
    return problems


def first_line(outcome: Outcome, root: Path) -> str:
    """The engine's most telling stderr line, paths shortened to the scenario's folder."""
    lines = [line for line in outcome.stderr.splitlines() if line.startswith(("error", "warning", "skipped"))]
    chosen = lines[0] if lines else "(no warning, no error)"
    return chosen.replace(str(root) + "/", "").replace(str(REPO) + "/", "")


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
        outputs = "-" if outcome.outputs is None else (", ".join(f"`{o}`" for o in outcome.outputs) or "empty")
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
             "fork) is killed at the end of the run (the harness is a child subreaper), also after a timeout."]
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
