"""Synthetic CT phantoms: determinism, label/image consistency, HU plausibility, manifest, CLI, geometry."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import phantoms
from phantoms import PhantomError, anatomy, cli, generate_phantom, write_dataset, writing
from phantoms.case import PADDING_HU

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(shape_zyx=(32, 96, 96), spacing_zyx=(6.0, 4.0, 4.0))
MEDIUM = dict(shape_zyx=(48, 128, 128), spacing_zyx=(5.0, 3.2, 3.2))


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_same_seed_and_index_give_the_same_case_whatever_else_is_generated(tmp_path):
    first = generate_phantom(11, 3, **SMALL)
    again = generate_phantom(11, 3, **SMALL)
    assert np.array_equal(array(first.image), array(again.image))
    assert np.array_equal(array(first.label), array(again.label))
    assert first.info == again.info
    other_seed = generate_phantom(12, 3, **SMALL)
    assert not np.array_equal(array(first.image), array(other_seed.image))
    # case 0 of a 1-case and of a 3-case dataset are identical files' contents
    write_dataset(tmp_path / "one", 1, seed=5, progress=False, **SMALL)
    write_dataset(tmp_path / "three", 3, seed=5, progress=False, **SMALL)
    for sub in ("images/phantom_0000_0000.nii.gz", "labels/phantom_0000.nii.gz"):
        a = sitk.ReadImage(str(tmp_path / "one" / sub))
        b = sitk.ReadImage(str(tmp_path / "three" / sub))
        assert np.array_equal(array(a), array(b))
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())["cases"][0]
    three = json.loads((tmp_path / "three" / "manifest.json").read_text())["cases"][0]
    assert one == three


def test_label_is_binary_uint8_with_the_image_geometry():
    phantom = generate_phantom(2, 0, healthy=False, **MEDIUM)
    image, label = phantom.image, phantom.label
    assert image.GetPixelID() == sitk.sitkInt16
    assert label.GetPixelID() == sitk.sitkUInt8
    assert image.GetSize() == label.GetSize() == (128, 128, 48)
    assert image.GetSpacing() == label.GetSpacing() == (3.2, 3.2, 5.0)
    assert image.GetOrigin() == label.GetOrigin()
    assert image.GetDirection() == label.GetDirection()
    values = np.unique(array(label))
    assert set(values.tolist()) == {0, 1}


def test_tissue_intensities_are_ct_like_and_lesions_lie_inside_the_body():
    phantom = generate_phantom(0, 1, healthy=False, with_tissue=True, **MEDIUM)  # lower chest, upper abdomen
    hu = array(phantom.image).astype(float)
    tissue = phantom.tissue
    label = array(phantom.label).astype(bool)

    def mean(cls):
        return hu[tissue == cls].mean()

    # air inside the reconstruction circle, away from the blurred edges of the body and the table
    outside = ndimage.binary_erosion(tissue == phantoms.AIR, iterations=2) & (hu > PADDING_HU)
    assert abs(hu[outside].mean() + 1000) < 5 and hu[outside].std() < 25
    assert -130 < mean(phantoms.SUBCUT) < -40  # mostly fat, with skin
    assert -125 < mean(phantoms.FAT) < -60
    assert 25 < mean(phantoms.MUSCLE) < 75
    assert 80 < mean(phantoms.LIVER) < 150
    assert -900 < mean(phantoms.LUNG) < -700
    assert mean(phantoms.CORTEX) > 400
    assert hu.min() >= -1024 and hu.max() <= 3071
    # the label is exactly the painted lesion voxels, all of them inside the body
    assert phantom.info["lesion_count"] >= 1
    assert np.array_equal(label, tissue == phantoms.LESION)
    around = ndimage.binary_dilation(label, iterations=1) & ~label
    assert not np.isin(tissue[around], (phantoms.AIR, phantoms.TABLE)).any()
    # lesions are visible: each differs from its surroundings by tens of HU
    components = cc3d.connected_components(label, connectivity=26)
    for lesion_id in range(1, components.max() + 1):
        lesion = components == lesion_id
        shell = ndimage.binary_dilation(lesion, iterations=2) & ~ndimage.binary_dilation(lesion, iterations=1)
        shell &= tissue != phantoms.LESION
        if lesion.sum() >= 20 and shell.sum() >= 20:
            assert abs(hu[lesion].mean() - np.median(hu[shell])) > 25


def test_healthy_cases_have_empty_labels(tmp_path):
    phantom = generate_phantom(3, 0, healthy=True, **SMALL)
    assert not array(phantom.label).any()
    assert phantom.info["healthy"] and phantom.info["lesion_count"] == 0 and phantom.info["lesions"] == []
    entries = write_dataset(tmp_path, 2, seed=3, healthy_fraction=1.0, progress=False, **SMALL)
    assert all(entry["healthy"] and entry["lesion_count"] == 0 for entry in entries)
    for entry in entries:
        assert not array(sitk.ReadImage(str(tmp_path / entry["label"]))).any()


def test_manifest_lesion_volumes_match_the_written_labels(tmp_path):
    entries = write_dataset(tmp_path, 3, seed=8, healthy_fraction=0.0, progress=False, **MEDIUM)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 8 and manifest["arguments"]["cases"] == 3
    assert manifest["arguments"]["shape_zyx"] == [48, 128, 128]
    assert manifest["cases"] == entries
    for entry in entries:
        label = array(sitk.ReadImage(str(tmp_path / entry["label"])))
        voxel_ml = float(np.prod(entry["spacing_zyx"])) / 1000
        assert entry["lesion_count"] == len(entry["lesions"]) >= 1
        assert entry["lesion_volume_ml"] == pytest.approx(label.sum() * voxel_ml, abs=1e-5)
        # one connected component per lesion, with the manifest's volume
        components = cc3d.connected_components(label, connectivity=26)
        counts = np.bincount(components.ravel())[1:]
        assert len(counts) == entry["lesion_count"]
        assert sorted(counts.tolist()) == sorted(lesion["voxels"] for lesion in entry["lesions"])
        for lesion in entry["lesions"]:
            assert lesion["volume_ml"] == pytest.approx(lesion["voxels"] * voxel_ml, abs=1e-6)
            assert lesion["type"] in phantoms.LESION_TYPES


def test_cli_writes_the_flare_layout(tmp_path):
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "phantoms", "--out", str(out), "--cases", "2",
                             "--seed", "4", "--shape", "32", "96", "96", "--spacing", "6", "4", "4",
                             "--healthy-fraction", "0.5", "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    names = [case["case"] for case in manifest["cases"]]
    assert names == ["phantom_0000", "phantom_0001"]
    assert manifest["arguments"]["healthy_fraction"] == 0.5
    for name in names:
        image = sitk.ReadImage(str(out / "images" / f"{name}_0000.nii.gz"))
        label = sitk.ReadImage(str(out / "labels" / f"{name}.nii.gz"))
        assert image.GetSize() == label.GetSize() == (96, 96, 32)
        assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels", "manifest.json"]  # no temporary files
    for path in [out / "manifest.json", *out.glob("*/*.nii.gz")]:
        assert path.stat().st_mode & 0o777 == 0o644  # readable by a container running as another user


def test_cli_rejects_bad_arguments_in_one_line(tmp_path, capsys):
    for flags, said in ((["--healthy-fraction", "1.5"], "argument --healthy-fraction: must be within [0, 1], got 1.5"),
                        (["--shape", "0", "8", "8"], "argument --shape: must be >= 1, got 0"),
                        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
                        (["--spacing", "nan", "1", "1"], "argument --spacing: must be > 0, got nan")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["--out", str(tmp_path / "x"), "--cases", "1", "--no-progress", *flags])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and err.splitlines() == [f"error: {said} (see python -m phantoms --help)"]
    assert not (tmp_path / "x").exists()
    with pytest.raises(PhantomError):
        generate_phantom(0, 0, direction=(0, 1, 0, 1, 0, 0, 0, 0, 1), **SMALL)


@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, -1, 0, 0, 0, 1), (1, 0, 0, 0, 1, 0, 0, 0, -1)])
def test_flipped_directions_are_written_and_show_the_same_anatomy(tmp_path, direction):
    reference = generate_phantom(6, 2, healthy=True, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), with_tissue=True,
                                 **SMALL)
    # the same voxel centres, reached through flipped axes: the origin moves to the other corner
    size = np.array(reference.image.GetSize()) - 1
    flips = np.diag(np.reshape(direction, (3, 3))) < 0
    origin = tuple(np.where(flips, np.array(reference.image.GetOrigin()) + size * reference.image.GetSpacing(),
                            reference.image.GetOrigin()))
    flipped = generate_phantom(6, 2, healthy=True, direction=direction, origin=origin, with_tissue=True,
                               **SMALL)
    phantoms.write_case(flipped, tmp_path)
    written = sitk.ReadImage(str(tmp_path / "images" / f"{flipped.info['case']}_0000.nii.gz"))
    assert np.allclose(written.GetDirection(), direction)
    assert np.allclose(written.GetOrigin(), origin, atol=1e-3)
    assert flipped.info["direction"] == [float(d) for d in direction]
    # anatomy is defined in physical millimetres: flipping the array axes back gives the same tissue
    axes = tuple(axis for axis, flip in zip((2, 1, 0), flips) if flip)
    same = np.flip(flipped.tissue, axis=axes) == reference.tissue
    assert same.mean() > 0.999


def test_default_geometry_looks_like_real_scans():
    for index in range(40):
        streams = np.random.SeedSequence([0, index]).spawn(6)
        patient = anatomy.make_patient(np.random.default_rng(streams[0]))
        shape, spacing, direction, origin, t_first = anatomy.choose_geometry(
            np.random.default_rng(streams[1]), patient, None, None, None, None)
        assert shape[1:] == (512, 512)
        assert 0.6 <= spacing[1] == spacing[2] <= 1.0
        assert 0.6 <= spacing[0] <= 5.0
        assert 250 <= shape[0] * spacing[0] <= 950
        assert shape[0] <= 720
        assert np.array_equal(np.abs(np.reshape(direction, (3, 3))), np.eye(3))


def test_flare_efficiency_case_has_the_fixed_size():
    specs = phantoms.flare_case_specs()
    sizes = (55, 100, 150, 215, 334, 448, 499, 554)
    assert [spec["name"] for spec in specs] == [f"flare_z{n:03d}" for n in sizes]
    phantom = phantoms.generate_flare_case(0, 55)
    assert phantom.info["case"] == "flare_z055"
    assert phantom.image.GetSize() == (512, 512, 55)
    s_x, s_y, s_z = phantom.image.GetSpacing()
    assert s_z == 5.0 and 0.6 <= s_x == s_y <= 1.0
    hu = array(phantom.image)
    assert (hu > -500).mean() > 0.15  # a body fills a good part of the field of view


def test_parallel_gzip_stream_reads_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(writing, "GZIP_CHUNK", 1 << 16)  # many chunks, deflated on two threads
    phantom = generate_phantom(1, 1, **SMALL)
    entry = phantoms.write_case(phantom, tmp_path)
    sitk.WriteImage(phantom.image, str(tmp_path / "raw.nii"), useCompression=False)
    packed = (tmp_path / entry["image"]).read_bytes()
    assert gzip.decompress(packed) == (tmp_path / "raw.nii").read_bytes()
    assert np.array_equal(array(sitk.ReadImage(str(tmp_path / entry["image"]))), array(phantom.image))


def test_enlarged_lymph_nodes_lie_in_nodal_stations_beside_vessels_and_normal_nodes_keep_a_fatty_hilum():
    geometry = dict(shape_zyx=(200, 192, 192), spacing_zyx=(3.0, 2.6, 2.6))
    nodal = []
    for index in range(40):
        case = generate_phantom(8, index, healthy=False, with_tissue=True, **geometry)
        assert (case.tissue == phantoms.NODAL_FAT).any() and (case.tissue == phantoms.NODE).any()
        for lesion in case.info["lesions"]:
            if lesion["type"] == "lymph_node":
                nodal.append((case, lesion))
        if len(nodal) >= 4:
            break
    assert len(nodal) >= 4
    spacing = np.array(geometry["spacing_zyx"])
    for case, lesion in nodal:
        assert lesion["diameter_mm"] >= 10.0
        lesion_mask = case.tissue == phantoms.LESION
        pieces = cc3d.connected_components(lesion_mask, connectivity=6)
        own = pieces == pieces[tuple(lesion["centre_index_zyx"])]
        vessel_mm = ndimage.distance_transform_edt(case.tissue != phantoms.VESSEL, sampling=spacing)[own].min()
        assert vessel_mm < 25.0, (case.info["case"], vessel_mm)
    # at a real scan's in-plane resolution a normal node is soft tissue with a fat hilum
    case = generate_phantom(8, 0, with_tissue=True)
    node_hu = array(case.image)[case.tissue == phantoms.NODE]
    assert np.percentile(node_hu, 5) < -40 and np.percentile(node_hu, 90) > 40 and np.median(node_hu) > 0


def test_clustering_types_draw_their_next_centre_near_an_earlier_lesion():
    from phantoms.lesions import _near_earlier
    pool = np.arange(8000)  # a 20 x 20 x 20 coarse grid, 4 mm apart
    earlier = [dict(type="lymph_node", centre_index_zyx=[0, 0, 0], diameter_mm=20.0)]
    grid = (20, 20, 20), np.array([4.0, 4.0, 4.0])
    near = _near_earlier(pool, *grid, earlier, "lymph_node", np.ones(3), diameter=10.0)
    distance = np.linalg.norm(np.stack(np.unravel_index(near, grid[0]), 1) * 4.0, axis=1)
    gap = phantoms.LESION_TYPES["lymph_node"]["cluster_gap_mm"]
    assert 0 < len(near) < 8000 and distance.max() < gap + 15.0 <= distance.max() + 4.0
    assert len(_near_earlier(pool, *grid, earlier, "liver", np.ones(3), diameter=10.0)) == 8000


def test_the_groin_of_a_whole_trunk_scan_has_inguinal_station_fat():
    case = generate_phantom(0, 7, shape_zyx=(554, 128, 128), spacing_zyx=(1.5, 4.0, 4.0), with_tissue=True)
    feet_end = case.tissue[:40] if not (case.tissue[:40] == phantoms.AIRWAY).any() else case.tissue[-40:]
    assert case.info["body_range_mm"][1] > 780 and (feet_end == phantoms.NODAL_FAT).sum() > 100


@pytest.mark.parametrize("shape, spacing, seeds", [
    ((160, 256, 256), None, (42, 3, 17)),  # a user's shape (issue 35: all lesions once lay in slices 0-11, at the edge)
    ((40, 128, 128), None, (5, 6)),
    ((64, 200, 160), (5.0, 2.0, 2.5), (7, 8)),
    ((24, 96, 96), (6.0, 4.0, 4.0), (9, 10)),
])
def test_lesions_lie_inside_the_volume_the_field_of_view_and_the_body_for_any_shape(shape, spacing, seeds):
    """For shapes and spacings the CLI accepts, every lesion is whole: no label voxel on a face of the volume or
    outside a circular field of view (where the image shows padding), and each lesion is surrounded by body."""
    placed = 0
    for seed in seeds:
        for index in range(2):
            phantom = generate_phantom(seed, index, shape_zyx=shape, spacing_zyx=spacing, healthy=False,
                                       with_tissue=True)
            label, hu = array(phantom.label).astype(bool), array(phantom.image)
            assert phantom.info["lesion_count"] == cc3d.connected_components(label, connectivity=26).max()
            if not label.any():
                continue
            placed += phantom.info["lesion_count"]
            for axis in range(3):
                assert not label.take(0, axis=axis).any() and not label.take(-1, axis=axis).any(), (seed, index)
            assert not (label & (hu <= PADDING_HU)).any()
            around = ndimage.binary_dilation(label, iterations=1) & ~label
            assert not np.isin(phantom.tissue[around], (phantoms.AIR, phantoms.TABLE)).any()
    assert placed >= len(seeds)  # lesions are still placed: the sweep tests something
