"""experiments/profile_training_step.py: operator and resolution breakdown of a training step."""
import json

import torch

from experiments.profile_training_step import main, operator_kind, resolution_level, training_setup, training_step
from conftest import CT_INTENSITIES
from training.model_folder import make_dataset_json, make_plans, plain_unet_arch_kwargs, write_model_folder
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


def small_unet_folder(model_dir):
    plans = make_plans(spacing=[3.0, 3.0, 3.0], patch_size=[16, 16, 16],
                       arch_kwargs=plain_unet_arch_kwargs(n_stages=4, base_features=4),
                       intensity_properties=CT_INTENSITIES)
    write_model_folder(model_dir, plans, make_dataset_json(None), {})
    weights = build_network(read_model_config(model_dir)).state_dict()
    write_model_folder(model_dir, plans, make_dataset_json(None), {"all": weights})
    return model_dir


def test_bf16_step_runs_the_convolutions_in_bf16_and_keeps_fp32_weights(tmp_path):
    network, optimizer, images, labels = training_setup(small_unet_folder(tmp_path / "model"), threads=1)
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    seen = []
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = first_conv.weight.detach().clone()
    training_step(network, optimizer, images, labels, bf16=True)
    training_step(network, optimizer, images, labels, bf16=False)
    assert seen == [torch.bfloat16, torch.float32]
    assert first_conv.weight.dtype == torch.float32 and not torch.equal(first_conv.weight, before)


def test_bf16_comparison_writes_both_step_times_and_their_ratio(tmp_path):
    model_dir = small_unet_folder(tmp_path / "model")
    assert main(["--model", str(model_dir), "--steps", "1", "--threads", "1", "--results", str(tmp_path),
                 "--compare-bf16"]) == 0
    comparison = json.loads((tmp_path / "training_step_bf16.json").read_text())["comparison"]
    fp32, bf16 = comparison["step_seconds_median"]["fp32"], comparison["step_seconds_median"]["bf16"]
    assert fp32 > 0 and bf16 > 0 and comparison["steps_per_precision"] == 3
    assert abs(comparison["bf16_speedup"] - fp32 / bf16) < 0.02 * fp32 / bf16 + 0.01
    assert "| bf16 |" in (tmp_path / "training_step_bf16.md").read_text()


def test_profile_of_a_small_unet_writes_shares_that_add_up(tmp_path):
    model_dir = small_unet_folder(tmp_path / "model")
    assert main(["--model", str(model_dir), "--steps", "1", "--threads", "1", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "training_step_profile.json").read_text())["profile"]
    assert result["patch_size"] == [16, 16, 16] and result["step_seconds_median"] > 0
    for table in (result["by_operator"], result["by_level"]):
        assert abs(sum(row["share"] for row in table.values()) - 1.0) < 0.01
    assert result["by_operator"]["convolution backward"]["ms"] > 0
    assert "16^3" in result["by_level"]
    assert "| convolution backward |" in (tmp_path / "training_step_profile.md").read_text()
