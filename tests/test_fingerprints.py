"""Content fingerprints (inference/model/fingerprint.py) and the provenance note every mask carries
(inference/provenance.py): what makes an export, a journal entry or an earlier mask the current one."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct_image, make_toy_model
from inference import PredictionSettings, io, load_model, provenance
from inference.model import fingerprint


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_CACHE_DIR", str(tmp_path / "cache"))
    fingerprint._remembered.clear()


def test_a_digest_follows_the_bytes_not_the_size_and_modification_time(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "RACY_S", 0.0)  # remember at once (the file was written just now)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    first = fingerprint.file_digest(path)
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 1  # remembered
    stat = path.stat()
    time.sleep(0.01)
    path.write_bytes(b"b" * 4096)  # other bytes, the same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same modification time (cp -p)
    fingerprint._remembered.clear()
    second = fingerprint.file_digest(path)
    assert second != first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # touched: the same bytes
    fingerprint._remembered.clear()
    assert fingerprint.file_digest(path) == second
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"b" * 4096)
    assert fingerprint.file_digest(copy) == fingerprint.file_digest(path)


def test_a_file_changed_within_the_clock_tick_is_not_remembered(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    fingerprint.file_digest(path)  # written just now: its ctime could be shared by a second change
    assert not (tmp_path / "cache" / "digests").exists()


def test_a_read_only_cache_hashes_every_time(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "RACY_S", 0.0)
    monkeypatch.setenv("FLARE_CACHE_DIR", "/proc/no-cache-here")
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    assert fingerprint.file_digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


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
        fingerprint._remembered.clear()
        assert load_model(model_dir, device="cpu").fingerprint() != before, name
        (model_dir / name).write_text(original)
    (model_dir / "lesion_filter.json").write_text(json.dumps({"min_volume_ml": 0.5}))
    assert load_model(model_dir, device="cpu").fingerprint() != before
    (model_dir / "lesion_filter.json").unlink()
    other = make_toy_model(tmp_path / "other", seed=1)
    (model_dir / "fold_all" / "checkpoint_final.pth").write_bytes(
        (other / "fold_all" / "checkpoint_final.pth").read_bytes())
    fingerprint._remembered.clear()
    assert load_model(model_dir, device="cpu").fingerprint() != before


def test_the_run_fingerprint_changes_with_each_setting_that_changes_a_mask_and_only_those():
    base = provenance.run_fingerprint("model", PredictionSettings())
    assert base == provenance.run_fingerprint("model", PredictionSettings(progress=True))
    assert base != provenance.run_fingerprint("other model", PredictionSettings())
    for changed in (dict(step_size=0.6), dict(patch_scale=1.0), dict(crop=False), dict(tta=True),
                    dict(min_lesion_ml=0.1), dict(min_lesion_probability=0.5), dict(resample_back="labels"),
                    dict(lesion_labels=(1,)), dict(time_budget_s=45.0), dict(patch_size=(32, 32, 32))):
        assert provenance.run_fingerprint("model", PredictionSettings(**changed)) != base, changed
    assert provenance.run_fingerprint("model", PredictionSettings(crop_function=lambda a, s: ())) is None


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
    assert io.reusable_mask_problem(source, output, provenance.mask_note("0123456789abcdef", source)) is not None
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
    monkeypatch.setattr(fingerprint, "RACY_S", 0.0)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model_dir = make_toy_model(tmp_path / "model")
    model = load_model(model_dir, device="cpu", backend="auto")
    assert model.backend == "torch" and len(model.fingerprint()) == 64
    assert not (tmp_path / "home").exists() and not list(model_dir.rglob("*.onnx"))
