"""ONNX export and the ONNX Runtime backend: parity with torch (masks and logits), dynamic and fixed
patches, both plans formats, float16 variant, provider choice, clear errors."""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import SimpleITK as sitk
import torch

from conftest import make_ct_image, make_toy_model, write_old_format_plans
from inference import ModelError, PredictionSettings, load_model, predict_image
from inference.backends import OnnxRuntimeNetwork, PatchRange
from inference.export_onnx import export_fold, export_for_cpu_where_missing
from inference.export_onnx import main as export_main
from inference.model.onnx_loader import (CPU, CUDA, TENSORRT, choose_providers, float16_model,
                                         has_dynamic_spatial_axes, open_fold, trt_cache_dir,
                                         trt_profile_shapes)
from inference.network_plan import check_request, inference_patch_size, largest_patch
from inference.pipeline import crop_box, to_model_space
from inference.sliding_window import sliding_window_logits
from training.model_folder import write_model_folder

REPO = Path(__file__).resolve().parent.parent
LESION_FRACTION = 0.1  # of the model-space body box, after calibration


def assert_same_mask(torch_mask: np.ndarray, onnx_mask: np.ndarray) -> None:
    """The docs' promise: the same mask, but for a voxel whose two logits tie within fp32 rounding (about 2e-6
    apart here), which another CPU's kernels may break the other way: at most 1 voxel in 10,000 (on this
    2-core AVX-512 CPU: none)."""
    assert (torch_mask != onnx_mask).sum() <= torch_mask.size // 10_000


def ct_volume() -> sitk.Image:
    """CT-like: air, an elliptic soft-tissue body with a bright blob, noise; several windows per axis."""
    return make_ct_image(shape_zyx=(40, 80, 96), spacing_xyz=(1.5, 1.5, 4.0), seed=3)


def calibrate_lesion_bias(model_dir: Path, image: sitk.Image, fraction: float = LESION_FRACTION) -> None:
    """Shift the lesion logit's bias so that `fraction` of the model-space voxels come out as lesion.

    A random network's argmax can be all one class, which would make mask parity meaningless. The bias
    of the last 1x1x1 convolution adds a constant to every window's lesion logit, hence to the
    Gaussian-weighted sliding-window average: the shift is exact.
    """
    model = load_model(model_dir, device="cpu")
    array, spacing = sitk.GetArrayFromImage(image), tuple(image.GetSpacing())[::-1]
    settings = PredictionSettings()
    box = crop_box(array, spacing, settings)
    volume = to_model_space(array[box].copy(), spacing, model)
    logits = sliding_window_logits(volume, model.networks, inference_patch_size(volume, model, settings)[0],
                                   model.config.num_classes)
    margin = (logits[1] - logits[0]).flatten()
    shift = torch.quantile(margin, 1 - fraction)
    state = model.networks[0].module.state_dict()
    bias_key = [k for k in state if "seg_layers" in k and k.endswith("bias")][-1]
    state[bias_key][1] -= shift
    plans = json.loads((model_dir / "plans.json").read_text())
    dataset = json.loads((model_dir / "dataset.json").read_text())
    write_model_folder(model_dir, plans, dataset, {"all": state})


def run_export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inference.export_onnx", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> Path:
    """A calibrated toy model, exported with the CLI (fp32 + fp16) into its default location."""
    model_dir = make_toy_model(tmp_path_factory.mktemp("onnx") / "Dataset001_Toy"
                               / "nnUNetTrainer__nnUNetPlans__3d_fullres", seed=7)
    calibrate_lesion_bias(model_dir, ct_volume())
    result = run_export_cli("-m", model_dir, "--fp16")
    assert result.returncode == 0, result.stderr
    diffs = [float(d) for d in re.findall(r"max abs diff ([0-9.e+-]+)", result.stdout)]
    assert len(diffs) == 2 and diffs[0] < 1e-4 and diffs[1] < 5e-2, result.stdout
    assert (model_dir / "fold_all" / "model.onnx").is_file()
    assert (model_dir / "fold_all" / "model_fp16.onnx").is_file()
    return model_dir


def test_onnx_masks_match_torch_on_a_ct_volume(exported_model):
    image = ct_volume()
    torch_mask = sitk.GetArrayFromImage(predict_image(image, load_model(exported_model, device="cpu")))
    onnx_model = load_model(exported_model, device="cpu", backend="onnx")
    assert onnx_model.backend == "onnx" and onnx_model.networks[0].provider == CPU
    onnx_mask = sitk.GetArrayFromImage(predict_image(image, onnx_model))
    assert 0.01 < torch_mask.mean() < 0.99  # non-trivial, thanks to the calibration
    assert_same_mask(torch_mask, onnx_mask)


def test_onnx_masks_match_torch_on_a_phantom(exported_model):
    phantoms = pytest.importorskip("phantoms")
    # a partial field of view at a coarse spacing keeps the model-space volume small (48 x 48 x 48)
    image = phantoms.generate_phantom(5, 0, shape_zyx=(24, 48, 48), spacing_zyx=(6.0, 3.0, 3.0),
                                      healthy=False).image
    torch_mask = sitk.GetArrayFromImage(predict_image(image, load_model(exported_model, device="cpu")))
    onnx_mask = sitk.GetArrayFromImage(
        predict_image(image, load_model(exported_model, device="cpu", backend="onnx")))
    assert 0 < torch_mask.sum()
    assert_same_mask(torch_mask, onnx_mask)


def test_cpu_session_runs_a_window_a_core_and_the_lanes_sum_the_same_bits(exported_model):
    model = load_model(exported_model, device="cpu", backend="onnx")
    network = model.networks[0]
    threads = torch.get_num_threads()
    assert network.lanes == (threads if threads <= 2 else 1)
    assert network.session.get_session_options().intra_op_num_threads == (1 if network.lanes > 1 else threads)
    image = ct_volume()
    array, spacing = sitk.GetArrayFromImage(image), tuple(image.GetSpacing())[::-1]
    volume = to_model_space(array.copy(), spacing, model)
    windows = {}
    for lanes in (1, 2, 3):
        windows[lanes] = sliding_window_logits(volume, model.networks, (32, 32, 32), model.config.num_classes,
                                               step_size=0.5, lanes=lanes)
    assert volume.shape[1] > 32 and volume.shape[2] > 32 and volume.shape[3] > 32  # several windows an axis
    assert torch.equal(windows[1], windows[2]) and torch.equal(windows[1], windows[3])


@pytest.mark.parametrize("patch", [(32, 32, 32), (48, 40, 32)])
def test_patch_logits_match_torch_for_any_stride_multiple(exported_model, patch):
    torch_net = load_model(exported_model, device="cpu").networks[0]
    onnx_net = load_model(exported_model, device="cpu", backend="onnx").networks[0]
    window = torch.randn((1, 1, *patch), generator=torch.Generator().manual_seed(1))
    expected, got = torch_net(window), onnx_net(window)
    assert got.shape == (1, 2, *patch) and got.dtype == torch.float32
    assert (expected - got).abs().max().item() < 1e-4  # observed about 2e-6
    # the io_binding path (used on CUDA) on CPU torch tensors gives the same logits
    torch.testing.assert_close(onnx_net.run_bound(window), got, rtol=0, atol=1e-6)
    # a non-contiguous view (sliding-window slices are) works too
    wide = torch.randn((1, 1, patch[0], patch[1], patch[2] + 8))
    assert (torch_net(wide[..., 4:-4]) - onnx_net(wide[..., 4:-4])).abs().max().item() < 1e-4


def test_fp16_variant_has_float16_io_and_agrees_roughly(exported_model):
    fold_dir = exported_model / "fold_all"
    session = ort.InferenceSession(str(fold_dir / "model_fp16.onnx"), providers=[CPU])
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float16)"
    assert session.get_modelmeta().custom_metadata_map["flare.precision"] == "fp16"
    window = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = load_model(exported_model, device="cpu").networks[0](window).numpy()
    got = session.run(None, {"patch": window.numpy().astype(np.float16)})[0].astype(np.float32)
    assert np.abs(expected - got).max() < 0.02 * np.abs(expected).max()
    # converting at load time gives the same graph as the exported file
    converted = float16_model(onnx.load(str(fold_dir / "model.onnx")))
    on_disk = onnx.load(str(fold_dir / "model_fp16.onnx"))
    assert converted.graph.SerializeToString() == on_disk.graph.SerializeToString()
    # the precision a run reports is the session's own: fp32 where no float16 model could be had
    assert OnnxRuntimeNetwork(session, torch.device("cpu")).precision == "fp16"
    fp32_session = ort.InferenceSession(str(fold_dir / "model.onnx"), providers=[CPU])
    assert OnnxRuntimeNetwork(fp32_session, torch.device("cpu")).precision == "fp32"


def test_missing_onnx_file_is_a_one_line_error_naming_the_export_command(tmp_path):
    model_dir = make_toy_model(tmp_path / "m")
    with pytest.raises(ModelError) as info:
        load_model(model_dir, device="cpu", backend="onnx")
    message = str(info.value)
    assert "\n" not in message
    assert str(model_dir / "fold_all" / "model.onnx") in message
    assert f"python -m inference.export_onnx -m {model_dir}" in message


@pytest.mark.parametrize("plans_format", ["architecture", "UNet_class_name", "residual"])
def test_export_of_both_plans_formats_and_residual_unets(tmp_path, plans_format):
    folds = ("0", "1") if plans_format == "architecture" else ("all",)  # several folds: once is enough
    model_dir = make_toy_model(tmp_path / "m", residual=plans_format == "residual", folds=folds)
    if plans_format == "UNet_class_name":
        write_old_format_plans(model_dir)
    for fold in folds:
        result = export_fold(model_dir, fold)
        assert result.path == model_dir / f"fold_{fold}" / "model.onnx"
        assert result.max_abs_diff < 1e-4
    torch_model = load_model(model_dir, device="cpu")
    onnx_model = load_model(model_dir, device="cpu", backend="onnx")
    assert onnx_model.folds == folds and len(onnx_model.networks) == len(folds)
    window = torch.randn(1, 1, 32, 40, 32)
    for torch_net, onnx_net in zip(torch_model.networks, onnx_model.networks):
        assert (torch_net(window) - onnx_net(window)).abs().max().item() < 1e-4


def test_fixed_patch_export_runs_that_patch_and_refuses_others(tmp_path, capsys):
    model_dir = make_toy_model(tmp_path / "m")
    output = tmp_path / "fixed.onnx"
    assert export_main(["-m", str(model_dir), "-o", str(output), "--patch-size", "32", "32", "40",
                        "--opset", "18"]) == 0
    assert "patch 32x32x40" in capsys.readouterr().out
    dims = onnx.load(str(output)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 32, 32, 40]
    (model_dir / "fold_all" / "model.onnx").write_bytes(output.read_bytes())
    model = load_model(model_dir, device="cpu", backend="onnx")
    network = model.networks[0]
    assert network.accepted_patches() == PatchRange((32, 32, 40), (32, 32, 40))
    assert network(torch.randn(1, 1, 32, 32, 40)).shape == (1, 2, 32, 32, 40)
    # refused before any case, naming the flag
    with pytest.raises(ModelError, match="fixed patch 32x32x40.*--patch-size 32 32 40"):
        check_request(model, PredictionSettings(patch_size=(32, 32, 32)))
    check_request(model, PredictionSettings())  # the default run takes the fixed patch
    with pytest.raises(ModelError, match="the 32x32x32 patch is not one it takes \\(only 32x32x40\\)"):
        network(torch.randn(1, 1, 32, 32, 32))


def test_export_errors_are_one_line_and_leave_no_file(tmp_path, caplog):
    model_dir = make_toy_model(tmp_path / "m")
    for args, expected in [(("--patch-size", "30", "32", "32"), "multiple of the network stride 4x4x4"),
                           (("--opset", "99"), "--opset 99 is not supported"),
                           (("-f", "3"), "fold(s) 3 not found"),
                           (("-f", "all", "all", "-o", "x.onnx"), "-o names one file")]:
        caplog.clear()
        assert export_main(["-m", str(model_dir), *args]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0], errors
    assert sorted(p.name for p in (model_dir / "fold_all").iterdir()) == ["checkpoint_final.pth"]


def test_reexport_without_fp16_removes_the_stale_fp16_file(tmp_path):
    model_dir = make_toy_model(tmp_path / "m")
    assert export_fold(model_dir, "all", fp16=True).fp16_path.is_file()
    export_fold(model_dir, "all")
    assert not (model_dir / "fold_all" / "model_fp16.onnx").exists()


def test_mirror_axes_travel_in_the_export_metadata(tmp_path):
    model_dir = make_toy_model(tmp_path / "m")
    plans = json.loads((model_dir / "plans.json").read_text())
    dataset = json.loads((model_dir / "dataset.json").read_text())
    weights = load_model(model_dir, device="cpu").networks[0].module.state_dict()
    write_model_folder(model_dir, plans, dataset, {"all": weights}, mirror_axes=(1, 2))
    export_fold(model_dir, "all")
    assert load_model(model_dir, device="cpu", backend="onnx").mirror_axes == (1, 2)


def test_provider_choice_and_fallback_warnings():
    gpu_build = [TENSORRT, CUDA, CPU]
    assert choose_providers("onnx", "cuda", gpu_build) == ([CUDA, CPU], None)
    assert choose_providers("tensorrt", "cuda", gpu_build) == ([TENSORRT, CUDA, CPU], None)
    providers, warning = choose_providers("tensorrt", "cuda", [CUDA, CPU])
    assert providers == [CUDA, CPU] and "TensorrtExecutionProvider is not available" in warning
    providers, warning = choose_providers("onnx", "cuda", ["AzureExecutionProvider", CPU])
    assert providers == [CPU] and "using CPUExecutionProvider" in warning and "\n" not in warning
    assert choose_providers("onnx", "cpu", gpu_build) == ([CPU], None)
    providers, warning = choose_providers("tensorrt", "cpu", gpu_build)
    assert providers == [CPU] and "needs a CUDA device" in warning
    with pytest.raises(ModelError, match="unknown backend 'openvino'"):
        choose_providers("openvino", "cpu", gpu_build)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_a_provider_that_does_not_start_falls_back_with_one_warning(exported_model, caplog):
    # this onnxruntime has no CUDA provider: asking for it is what a GPU build without CUDA libraries does
    config = load_model(exported_model, device="cpu").config
    path = exported_model / "fold_all" / "model.onnx"
    network = open_fold(path, config, torch.device("cuda", 0), [CUDA, CPU])
    assert network.provider == CPU and not network.on_gpu
    assert network.input_dtype == torch.float32  # the fp32 file again, not the float16 one CUDA gets
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["warning: CUDAExecutionProvider did not start (see the onnxruntime message "
                        "above); using CPUExecutionProvider"]


def test_tensorrt_cache_location(tmp_path, monkeypatch, caplog):
    fold_dir = tmp_path / "model" / "fold_all"
    fold_dir.mkdir(parents=True)
    monkeypatch.delenv("FLARE_TRT_CACHE_DIR", raising=False)
    assert trt_cache_dir(fold_dir) == fold_dir.resolve() / "trt_cache"
    monkeypatch.setenv("FLARE_TRT_CACHE_DIR", str(tmp_path / "cache"))
    assert trt_cache_dir(fold_dir) == tmp_path / "cache" / "model" / "fold_all"
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("FLARE_TRT_CACHE_DIR", str(tmp_path / "a_file"))  # cannot make folders in it
    fallback = trt_cache_dir(fold_dir)
    assert fallback.is_dir() and "flare_trt_cache" in str(fallback)
    assert "is not writable" in caplog.text


def test_dynamic_axes_detection(exported_model, tmp_path):
    assert has_dynamic_spatial_axes(exported_model / "fold_all" / "model.onnx")
    model_dir = make_toy_model(tmp_path / "m")
    fixed = export_fold(model_dir, "all", patch_size=(32, 32, 32)).path
    assert not has_dynamic_spatial_axes(fixed)


def test_tensorrt_profile_covers_the_patches_a_run_asks_for(tmp_path):
    config = load_model(make_toy_model(tmp_path / "m"), device="cpu").config
    profile = trt_profile_shapes(config, largest_patch(config, PredictionSettings(patch_scale=1.2)))
    assert profile == {"trt_profile_min_shapes": "patch:1x1x32x32x32",
                       "trt_profile_opt_shapes": "patch:1x1x40x40x40",
                       "trt_profile_max_shapes": "patch:1x1x40x40x40"}


def test_cli_backend_onnx_writes_the_same_mask_as_torch(tmp_path, exported_model):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = ct_volume()
    sitk.WriteImage(image, str(inputs / "case_0000.nii.gz"))
    result = subprocess.run([sys.executable, "-m", "inference", "-i", inputs, "-o", tmp_path / "out",
                             "-m", exported_model, "--device", "cpu", "--backend", "onnx"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "onnx on cpu" in result.stderr
    onnx_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz")))
    torch_mask = sitk.GetArrayFromImage(predict_image(image, load_model(exported_model, device="cpu")))
    assert_same_mask(torch_mask, onnx_mask)


def test_auto_backend_on_the_cpu_exports_once_into_its_cache_and_writes_torchs_mask(tmp_path, monkeypatch, caplog):
    """`--backend auto`: ONNX Runtime on the CPU from an export cached outside the (read-only) model folder,
    made once, before loading (loading only loads), and found by content: a checkpoint touched (a new modification
    time, the same bytes) keeps it. Changed content is exported again: tests/test_fingerprints.py."""
    model_dir = make_toy_model(tmp_path / "model", seed=7)
    calibrate_lesion_bias(model_dir, ct_volume())  # a mask worth comparing (see the function)
    monkeypatch.setenv("FLARE_ONNX_CACHE", str(tmp_path / "cache"))
    model_dir.chmod(0o555)
    (model_dir / "fold_all").chmod(0o555)
    try:
        assert load_model(model_dir, device="cpu", backend="auto").backend == "torch"  # nothing to load yet
        assert not (tmp_path / "cache").exists()  # and loading made nothing
        with caplog.at_level(logging.INFO, logger="inference"):
            export_for_cpu_where_missing(model_dir)
        assert "exporting fold all of" in caplog.text and "(--backend torch skips it)" in caplog.text
        auto = load_model(model_dir, device="cpu", backend="auto")
        assert auto.backend == "onnx" and not list(model_dir.rglob("*.onnx"))
        cached = list((tmp_path / "cache").rglob("model.onnx"))
        assert len(cached) == 1
        image = ct_volume()
        torch_mask = sitk.GetArrayFromImage(predict_image(image, load_model(model_dir, device="cpu")))
        auto_mask = sitk.GetArrayFromImage(predict_image(image, auto))
        assert 0.01 < torch_mask.mean() < 0.99
        assert_same_mask(torch_mask, auto_mask)
        stamp = cached[0].stat().st_mtime_ns
        export_for_cpu_where_missing(model_dir)
        assert load_model(model_dir, device="cpu", backend="auto").backend == "onnx"
        assert cached[0].stat().st_mtime_ns == stamp  # reused, not exported again
    finally:
        (model_dir / "fold_all").chmod(0o755)
        model_dir.chmod(0o755)
    checkpoint = model_dir / "fold_all" / "checkpoint_final.pth"
    os.utime(checkpoint, ns=(stamp, stamp + 10 ** 9))  # the same bytes, another modification time
    export_for_cpu_where_missing(model_dir)
    assert load_model(model_dir, device="cpu", backend="auto").backend == "onnx"
    assert list((tmp_path / "cache").rglob("model.onnx")) == cached and cached[0].stat().st_mtime_ns == stamp


def test_auto_backend_without_onnxruntime_runs_torch(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    model_dir = make_toy_model(tmp_path / "model")
    export_for_cpu_where_missing(model_dir)  # nothing to export for
    model = load_model(model_dir, device="cpu", backend="auto")
    assert model.backend == "torch"
