"""The shared tooling: atomic files, machine facts, result paths."""
from __future__ import annotations

import json
import os

import psutil
import pytest

from flare_common.files import atomic_path, write_json_atomically, write_text_atomically
from flare_common.machine import cpu_label, cpu_model, device_facts, machine_facts
from flare_common.results import REPO, display, write_result


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic_path(target) as written:
        assert written.name == "table.csv" and written.parent.name.startswith(".partial-")
        written.write_text("a,b\n")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_text() == "a,b\n" and os.listdir(target.parent) == ["table.csv"]
    with pytest.raises(RuntimeError):
        with atomic_path(target) as written:
            written.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "a,b\n" and os.listdir(target.parent) == ["table.csv"]


def test_json_and_text(tmp_path):
    write_text_atomically(tmp_path / "a.md", "# a\n")
    write_json_atomically(tmp_path / "a.json", {"x": [1, 2]})
    assert (tmp_path / "a.md").read_text() == "# a\n"
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    with pytest.raises(ValueError):
        write_json_atomically(tmp_path / "nan.json", {"x": float("nan")})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.md"]


def test_machine_facts_name_the_cpu_its_vector_level_and_take_a_benchmarks_own_facts():
    import torch
    facts = machine_facts(threads=3)
    assert facts["cpu"] == cpu_model() and facts["cpu"]
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["cores"] == os.cpu_count() and facts["threads"] == 3
    assert abs(facts["memory_gb"] - psutil.virtual_memory().total / 2 ** 30) < 0.1
    assert facts["torch"] == torch.__version__ and len(facts["load_average_at_start"]) == 3
    assert facts["date"].endswith("+00:00")
    assert cpu_label(facts) == f"{facts['cpu']}, torch CPU capability {facts['cpu_capability']}"
    assert cpu_label({"cpu": "Old CPU"}) == "Old CPU"


def test_display_is_relative_inside_the_repository(tmp_path):
    assert display(REPO / "results" / "x.md") == "results/x.md"
    assert display(tmp_path / "x.md") == str((tmp_path / "x.md").resolve())


def test_write_result_names_the_files_by_device_and_date(tmp_path):
    facts = device_facts("cpu")
    assert "gpu" not in facts
    result = {"machine": dict(facts, cpu="AMD EPYC 7B13", date="2026-12-01T18:00:00+00:00"), "value": 1.5}
    stem = write_result("model_load", result, "# a table\n", tmp_path)
    assert stem == tmp_path / "model_load_amd-epyc-7b13_2026-12-01"
    assert json.loads(stem.with_suffix(".json").read_text())["value"] == 1.5
    assert stem.with_suffix(".md").read_text() == "# a table\n"
    on_gpu = dict(result, machine=dict(result["machine"], gpu="NVIDIA H200"))
    assert write_result("batch_throughput", on_gpu, "", tmp_path).name == "batch_throughput_nvidia-h200_2026-12-01"
