"""benchmarks/profile_training_step.py: operator and resolution breakdown of a training step."""
import json

from benchmarks.profile_training_step import main, operator_kind, resolution_level
from conftest import CT_INTENSITIES
from inference.model.folder import make_dataset_json, make_plans, plain_unet_arch_kwargs, write_model_folder
from inference.model.network import build_network
from inference.model.plans import read_model_config


def test_operators_are_grouped_by_kind():
    assert operator_kind("aten::convolution_backward") == "convolution backward"
    assert operator_kind("aten::mkldnn_convolution") == "convolution forward"
    assert operator_kind("aten::native_batch_norm_backward") == "normalisation"
    assert operator_kind("aten::copy_") == "layout copies"
    assert operator_kind("Optimizer.step#AdamW.step") == "optimiser"
    assert operator_kind("aten::leaky_relu_") == "other"


def test_resolution_level_is_the_first_activation_not_a_weight():
    assert resolution_level([[8, 8, 3, 3, 3], [4, 8, 32, 32, 32]], batch_size=4) == "32^3"
    assert resolution_level([[1, 32, 16, 16, 16], [32]], batch_size=4) == "16^3"   # instance norm as batch norm
    assert resolution_level([[4, 2, 8, 16, 16]], batch_size=4) == "8x16x16"
    assert resolution_level([[16, 8, 2, 2, 2]], batch_size=4) == "other"
    assert resolution_level(None, batch_size=4) == "other"


def test_profile_of_a_small_unet_writes_shares_that_add_up(tmp_path):
    model_dir = tmp_path / "model"
    plans = make_plans(spacing=[3.0, 3.0, 3.0], patch_size=[16, 16, 16],
                       arch_kwargs=plain_unet_arch_kwargs(n_stages=4, base_features=4),
                       intensity_properties=CT_INTENSITIES)
    write_model_folder(model_dir, plans, make_dataset_json(None), {})
    weights = build_network(read_model_config(model_dir)).state_dict()
    write_model_folder(model_dir, plans, make_dataset_json(None), {"all": weights})
    assert main(["--model", str(model_dir), "--steps", "1", "--threads", "1", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "training_step_profile.json").read_text())["profile"]
    assert result["patch_size"] == [16, 16, 16] and result["step_seconds_median"] > 0
    for table in (result["by_operator"], result["by_level"]):
        assert abs(sum(row["share"] for row in table.values()) - 1.0) < 0.01
    assert result["by_operator"]["convolution backward"]["ms"] > 0
    assert "16^3" in result["by_level"]
    assert "| convolution backward |" in (tmp_path / "training_step_profile.md").read_text()
