"""Content fingerprints (inference/model/fingerprint.py) and the provenance note every mask carries
(inference/provenance.py): what makes an export, a journal entry or an earlier mask the current one."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct_image, make_toy_model
from inference import ModelError, PredictionSettings, io, load_model, provenance
from flare_common import digests


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_CACHE_DIR", str(tmp_path / "cache"))
    digests._remembered.clear()


def test_a_digest_follows_the_bytes_not_the_size_and_modification_time(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "RACY_S", 0.0)  # remember at once (the file was written just now)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    first = digests.file_digest(path)
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 1  # remembered
    stat = path.stat()
    time.sleep(0.01)
    path.write_bytes(b"b" * 4096)  # other bytes, the same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same modification time (cp -p)
    digests._remembered.clear()
    second = digests.file_digest(path)
    assert second != first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # touched: the same bytes
    digests._remembered.clear()
    assert digests.file_digest(path) == second
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"b" * 4096)
    assert digests.file_digest(copy) == digests.file_digest(path)


def test_a_file_changed_within_the_clock_tick_is_not_remembered(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    digests.file_digest(path)  # written just now: its ctime could be shared by a second change
    assert not (tmp_path / "cache" / "digests").exists()


def test_a_cache_that_cannot_be_written_hashes_every_time(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    monkeypatch.setenv("FLARE_CACHE_DIR", "/proc/no-cache-here")
    hashed = []
    real_file_digest = digests.hashlib.file_digest
    monkeypatch.setattr(digests.hashlib, "file_digest", lambda *args: hashed.append(args) or real_file_digest(*args))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    for _ in range(2):  # two processes, as far as the digests know
        digests._remembered.clear()
        assert digests.file_digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert len(hashed) == 2 and not Path("/proc/no-cache-here").exists()


def test_an_uncompressed_input_changed_in_the_middle_gets_another_fingerprint(tmp_path):
    """Size, modification time and both ends kept (as `cp -p` of a same-sized scan would): only the content differs."""
    path = tmp_path / "case_0000.nii"
    path.write_bytes(bytes(3 << 20))
    stat = path.stat()
    before = provenance.input_fingerprint(path)
    with open(path, "r+b") as file:
        file.seek(3 << 19)
        file.write(b"\x01")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    digests._remembered.clear()
    assert provenance.input_fingerprint(path) != before


def test_the_model_fingerprint_names_plans_dataset_weights_and_lesion_filter(tmp_path):
    model_dir = make_toy_model(tmp_path / "model")
    before = load_model(model_dir, device="cpu").fingerprint()
    assert load_model(model_dir, device="cpu").fingerprint() == before
    for name, edit in (("plans.json", lambda d: d["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
                        ["nonlin_kwargs"].__setitem__("negative_slope", 0.3)),
                       ("dataset.json", lambda d: d.__setitem__("name", "renamed"))):
        original = (model_dir / name).read_text()
        data = json.loads(original)
        edit(data)
        (model_dir / name).write_text(json.dumps(data))
        digests._remembered.clear()
        assert load_model(model_dir, device="cpu").fingerprint() != before, name
        (model_dir / name).write_text(original)
    (model_dir / "lesion_filter.json").write_text(json.dumps({"min_volume_ml": 0.5}))
    assert load_model(model_dir, device="cpu").fingerprint() != before
    (model_dir / "lesion_filter.json").unlink()
    other = make_toy_model(tmp_path / "other", seed=1)
    (model_dir / "fold_all" / "checkpoint_final.pth").write_bytes(
        (other / "fold_all" / "checkpoint_final.pth").read_bytes())
    digests._remembered.clear()
    assert load_model(model_dir, device="cpu").fingerprint() != before


def test_the_run_fingerprint_changes_with_each_setting_that_changes_a_mask_and_only_those():
    def run(model="model", backend="auto", device="auto", precision=None, **settings):
        return provenance.run_fingerprint(model, PredictionSettings(**settings), backend, device, precision)

    base = run()
    assert base != run("other model") and base != run(backend="torch") and base != run(device="cpu")
    assert len({base, run(precision="fp16"), run(precision="fp32")}) == 3
    for changed in (dict(step_size=0.6), dict(patch_scale=1.2), dict(crop="none"), dict(crop="box"), dict(tta=True),
                    dict(min_lesion_ml=0.1), dict(min_lesion_probability=0.5), dict(resample_back="labels"),
                    dict(lesion_labels=(1,)), dict(time_budget_s=45.0), dict(patch_size=(32, 32, 32))):
        assert run(**changed) != base, changed


def test_a_mask_keeps_its_note_and_is_reused_only_for_the_same_run_and_input(tmp_path):
    image = make_ct_image()
    source = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(image, str(source))
    mask = sitk.GetImageFromArray(np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8))
    mask.CopyInformation(image)
    note = provenance.mask_note("0123456789abcdef", source)
    assert len(note.encode()) <= 80  # a NIfTI header's descrip
    output = tmp_path / "out" / "case.nii.gz"
    io.write_image_atomically(mask, output, note)
    assert io.read_note(io.read_header(output)) == note
    assert io.reusable_mask_problem(source, output, note) is None
    assert io.reusable_mask_problem(source, output, provenance.mask_note("fedcba9876543210", source)) == (
        "made by another model, other settings or from another input")
    time.sleep(0.01)
    sitk.WriteImage(make_ct_image(seed=5), str(source))  # the input replaced
    assert io.reusable_mask_problem(source, output, provenance.mask_note("0123456789abcdef", source)) == (
        "made by another model, other settings or from another input")
    moved = sitk.GetImageFromArray(np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8))
    moved.CopyInformation(image)
    moved.SetOrigin((0.0, 0.0, 0.0))
    note = provenance.mask_note("0123456789abcdef", source)
    io.write_image_atomically(moved, output, note)
    assert io.reusable_mask_problem(source, output, note).startswith("not on the input's grid: its grid is moved")


def test_the_write_check_refuses_a_grid_the_file_cannot_hold_and_accepts_an_oblique_one(tmp_path):
    oblique = sitk.Image([6, 5, 4], sitk.sitkUInt8)
    oblique.SetSpacing((0.7, 0.7, 2.5))
    oblique.SetOrigin((-250.3, -180.1, -1200.4))
    c, s = np.cos(0.3), np.sin(0.3)
    oblique.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    io.write_image_atomically(oblique, tmp_path / "oblique.nii.gz")
    assert io.grid_difference(oblique, io.read_header(tmp_path / "oblique.nii.gz")) == ""
    sheared = sitk.Image([6, 5, 4], sitk.sitkUInt8)
    sheared.SetDirection((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(io.CaseError, match="sheared.nii.gz: not written: the file format cannot hold the input's grid"):
        io.write_image_atomically(sheared, tmp_path / "sheared.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oblique.nii.gz"]


def test_no_cache_at_all_where_the_cache_is_off(tmp_path, monkeypatch):
    """FLARE_CACHE_DIR=off (the submission image): nothing is remembered or exported; the CPU runs torch."""
    monkeypatch.setenv("FLARE_CACHE_DIR", "off")
    monkeypatch.delenv("FLARE_ONNX_CACHE", raising=False)
    monkeypatch.setattr(digests, "RACY_S", 0.0)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model_dir = make_toy_model(tmp_path / "model")
    from inference.export_onnx import export_for_cpu_where_missing
    export_for_cpu_where_missing(model_dir)
    model = load_model(model_dir, device="cpu", backend="auto")
    assert model.backend == "torch" and len(model.fingerprint()) == 64
    assert not (tmp_path / "home" / ".cache" / "flare-inference").exists() and not list(model_dir.rglob("*.onnx"))


def test_an_export_shipped_without_its_checkpoint_is_checked_against_the_plans(tmp_path):
    from inference.export_onnx import export_fold
    model_dir = make_toy_model(tmp_path / "model")
    export_fold(model_dir, "all")
    (model_dir / "fold_all" / "checkpoint_final.pth").unlink()  # shipped for ONNX Runtime only
    model = load_model(model_dir, device="cpu", backend="onnx")
    assert model.backend == "onnx" and len(model.fingerprint()) == 64
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin_kwargs"]["negative_slope"] = 0.3
    (model_dir / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="model.onnx: not used: it was exported from another plans.json or "
                                         "dataset.json than the model folder holds now; export it again"):
        load_model(model_dir, device="cpu", backend="onnx")
