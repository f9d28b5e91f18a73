"""Model folders: both plans formats, inherits_from, folds, safe checkpoints, clear errors."""
import json
import os

import pytest
import torch

from conftest import make_toy_model, write_old_format_plans
from inference.errors import ModelError
from inference.model import load_model, read_model_config
from inference.model.checkpoint import load_checkpoint


def test_new_and_old_plans_build_the_same_network(tmp_path):
    new_dir = make_toy_model(tmp_path / "new")
    old_dir = make_toy_model(tmp_path / "old")
    write_old_format_plans(old_dir)
    assert "architecture" not in json.dumps(json.loads((old_dir / "plans.json").read_text()))
    new_model, old_model = load_model(new_dir, device="cpu"), load_model(old_dir, device="cpu")
    patch = torch.randn(1, 1, 32, 32, 32)
    new_out, old_out = new_model.networks[0](patch), old_model.networks[0](patch)
    assert new_out.shape == (1, 2, 32, 32, 32)
    torch.testing.assert_close(new_out, old_out)
    assert read_model_config(old_dir).total_stride == (4, 4, 4)


def test_residual_encoder_unet_loads(tmp_path):
    model = load_model(make_toy_model(tmp_path / "res", residual=True), device="cpu")
    assert type(model.networks[0].module).__name__ == "ResidualEncoderUNet"


def test_inherits_from_applies_parent_then_child(tmp_path):
    model_dir = make_toy_model(tmp_path / "m")
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["configurations"]["3d_bigpatch"] = {"inherits_from": "3d_fullres", "patch_size": [48, 48, 48]}
    (model_dir / "plans.json").write_text(json.dumps(plans))
    config = read_model_config(model_dir, "3d_bigpatch")
    assert config.patch_size == (48, 48, 48)
    assert config.spacing == (3.0, 3.0, 3.0)
    assert config.network_class_name.endswith("PlainConvUNet")


def test_folds_default_and_selection(tmp_path):
    model_dir = make_toy_model(tmp_path / "m", folds=(0, 1, 2))
    assert load_model(model_dir, device="cpu").folds == ("0", "1", "2")
    assert load_model(model_dir, folds=[1], device="cpu").folds == ("1",)
    with pytest.raises(ModelError, match="fold.*4.*not found"):
        load_model(model_dir, folds=[4], device="cpu")


def test_fold_all_preferred_when_present(tmp_path):
    model_dir = make_toy_model(tmp_path / "m", folds=("all", 0))
    assert load_model(model_dir, device="cpu").folds == ("all",)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("mmap", [False, True])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, mmap):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "checkpoint_final.pth"
    # a checkpoint that creates a folder when unpickled unsafely
    torch.save({"network_weights": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ModelError, match="refused or unreadable checkpoint"):
        load_checkpoint(path, mmap=mmap)
    assert not os.path.exists(marker)
    with pytest.raises(FileNotFoundError):  # the same payload does run under an unsafe load
        os.rmdir(marker)
    torch.load(path, weights_only=False)
    assert os.path.isdir(marker)


def test_checkpoint_with_numpy_scalars_in_logging_loads(tmp_path):
    import numpy as np
    path = tmp_path / "c.pth"
    torch.save({"network_weights": {"w": torch.ones(2)}, "logging": {"ema": [np.float64(0.5)]},
                "init_args": {"device": torch.device("cpu")}}, path)
    assert load_checkpoint(path)["logging"]["ema"][0] == 0.5


def test_a_mapped_checkpoint_holds_what_a_read_one_holds(tmp_path):
    shared = torch.randn(3, 4)
    path = tmp_path / "c.pth"
    torch.save({"network_weights": {"a": shared, "b": shared, "c": torch.arange(5)},
                "optimizer_state": {"state": {0: {"momentum_buffer": torch.ones(3, 4)}}}}, path)
    mapped, read = load_checkpoint(path, mmap=True), load_checkpoint(path)
    for key in ("a", "b", "c"):
        assert torch.equal(mapped["network_weights"][key], read["network_weights"][key])
    assert mapped["network_weights"]["a"].data_ptr() == mapped["network_weights"]["b"].data_ptr()  # still shared


def test_loaded_weights_are_the_checkpoints_in_fp32_and_shared_modules_stay_shared(tmp_path):
    model_dir = make_toy_model(tmp_path / "m", residual=True, seed=3)
    weights = load_checkpoint(model_dir / "fold_all" / "checkpoint_final.pth")["network_weights"]
    module = load_model(model_dir, device="cpu", backend="torch").networks[0].module
    state = module.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[key], weights[key]) and state[key].dtype == weights[key].dtype for key in state)
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    if hasattr(module, "decoder") and hasattr(module.decoder, "encoder"):
        assert module.decoder.encoder is module.encoder


def test_plans_cannot_import_arbitrary_code(tmp_path):
    model_dir = make_toy_model(tmp_path / "m")
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (model_dir / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="network_class_name: refusing 'os.system'"):
        load_model(model_dir, device="cpu")


def test_mismatched_weights_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(tmp_path / "nothing", device="cpu")
    model_dir = make_toy_model(tmp_path / "m")
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32]
    (model_dir / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="weights do not fit") as info:
        load_model(model_dir, device="cpu")
    assert "\n" not in str(info.value)


def test_conv_counts_per_stage_become_nnunet_arch_kwargs_and_a_wrong_count_is_refused():
    from training.model_folder import plain_unet_arch_kwargs
    kwargs = plain_unet_arch_kwargs(4, base_features=4, n_conv_per_stage=[1, 2, 2, 3])
    assert kwargs["n_conv_per_stage"] == [1, 2, 2, 3] and kwargs["n_conv_per_stage_decoder"] == [1, 2, 2]
    kwargs = plain_unet_arch_kwargs(4, base_features=4, n_conv_per_stage=2, n_conv_per_stage_decoder=1)
    assert kwargs["n_conv_per_stage"] == [2] * 4 and kwargs["n_conv_per_stage_decoder"] == [1] * 3
    assert plain_unet_arch_kwargs(3, residual=True, n_conv_per_stage=[1, 3, 4])["n_blocks_per_stage"] == [1, 3, 4]
    with pytest.raises(ValueError, match="3 conv counts for 4 stages"):
        plain_unet_arch_kwargs(4, n_conv_per_stage=[1, 2, 2])


def test_a_random_weights_model_folder_loads_and_its_weights_follow_the_seed(tmp_path):
    from training.model_folder import (SYNTHETIC_CT_INTENSITIES, make_dataset_json, make_plans,
                                        plain_unet_arch_kwargs, write_random_model_folder)
    plans = make_plans(spacing=[3.0, 3.0, 3.0], patch_size=[16, 16, 16],
                       arch_kwargs=plain_unet_arch_kwargs(3, base_features=4, max_features=8),
                       intensity_properties=SYNTHETIC_CT_INTENSITIES)
    folders = [write_random_model_folder(tmp_path / name, plans, make_dataset_json(), seed)
               for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    weights = [torch.load(f / "fold_all" / "checkpoint_final.pth", weights_only=False)["network_weights"]
               for f in folders]
    key = next(k for k in weights[0] if k.endswith("conv.weight"))
    assert torch.equal(weights[0][key], weights[1][key]) and not torch.equal(weights[0][key], weights[2][key])
    assert load_model(folders[0], device="cpu").config.patch_size == (16, 16, 16)
