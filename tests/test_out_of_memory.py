"""Out of GPU memory: each fallback step (logits on the CPU, a smaller patch, the network on the CPU) is
taken in turn when the error is injected at the step before it, with a warning naming it; the result is the
sliding window of the step that succeeded. Runs on the CPU: the model's device is set to CUDA only so that
the engine plans its GPU fallbacks; the injected networks compute on the CPU."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_toy_model
from inference import PredictionSettings, load_model
from inference.backends import PatchRange
from inference.network_plan import network_logits, out_of_memory_attempts
from inference.sliding_window import sliding_window_logits


class FailingNetwork:
    """Raises torch.OutOfMemoryError on its first `failures["left"]` calls: each ends one attempt."""

    lanes, movable, source = 1, True, "injected"

    def __init__(self, network, failures: dict, moves: list, device="cuda"):
        self.network, self.failures, self.moves, self.device = network, failures, moves, device
        self.started = False

    def accepted_patches(self):
        return PatchRange()

    def on(self, device):
        self.moves.append(str(device))
        return FailingNetwork(self.network, self.failures, self.moves, str(device))

    def __call__(self, patch):
        if self.failures["left"] > 0:  # an attempt stops at its first error: one failure, one attempt
            self.failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.network(patch)


@pytest.fixture
def setup(tmp_path):
    model = load_model(make_toy_model(tmp_path / "model"), device="cpu")
    real = model.networks[0]
    volume = torch.randn(1, 40, 44, 48)
    return model, real, volume


@pytest.mark.parametrize("failures", [0, 1, 2, 3])
def test_each_fallback_step_is_taken_in_turn(setup, failures, caplog):
    model, real, volume = setup
    moves: list = []
    state = {"left": failures}
    model.networks = [FailingNetwork(real, state, moves)]
    model.device = torch.device("cuda")  # plan the GPU fallbacks; the computation stays on the CPU
    settings = PredictionSettings(patch_size=(40, 40, 40))
    attempts = out_of_memory_attempts((40, 40, 40), model)
    assert [a.label for a in attempts] == ["", "the logits accumulated on the CPU", "the smaller patch 32x32x32",
                                          "the network on the CPU"]

    with caplog.at_level(logging.WARNING, logger="inference"):
        result = network_logits(volume, model, settings)
    logits, patch = result.logits, result.patch_size
    warnings = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert warnings == [f"warning: out of GPU memory; retrying with {a.label}" for a in attempts[1:failures + 1]]
    assert patch == attempts[failures].patch
    expected = sliding_window_logits(volume, [real], patch, model.config.num_classes)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert moves == (["cpu", "cuda"] if failures == 3 else [])  # the network back where it was


def test_out_of_memory_at_every_step_is_raised(setup):
    model, real, volume = setup
    model.networks = [FailingNetwork(real, {"left": 4}, [])]
    model.device = torch.device("cuda")
    with pytest.raises(torch.OutOfMemoryError):
        network_logits(volume, model, PredictionSettings(patch_size=(40, 40, 40)))


def test_on_the_cpu_there_is_no_fallback(setup):
    model, real, volume = setup
    model.networks = [FailingNetwork(real, {"left": 1}, [])]
    assert len(out_of_memory_attempts((40, 40, 40), model)) == 1
    with pytest.raises(torch.OutOfMemoryError):
        network_logits(volume, model, PredictionSettings(patch_size=(40, 40, 40)))
