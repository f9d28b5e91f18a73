"""The structure the code keeps (read with `ast`, tests/structure.py): no import circle inside the engine, the
process environment read in one place, no `args.` below the command line, tooling on the engine's public names only,
settings that cannot change under a run. Each rule is shown to fire on a small module that breaks it."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from inference.settings import ENVIRONMENT_VARIABLES, PredictionSettings, RunOptions
import structure
from structure import Module

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def modules():
    return structure.read_modules()


def fake(name: str, source: str) -> Module:
    return Module(name, REPO / (name.replace(".", "/") + ".py"), ast.parse(source))


def test_no_import_circle_inside_the_engine(modules):
    assert structure.circles(modules) == []


def test_the_circle_finder_finds_a_circle_made_on_purpose(modules):
    broken = dict(modules)
    broken["inference.settings"] = fake("inference.settings", "from .pipeline import predict_image\n")
    for module in broken.values():
        module.imports = {target for target, _ in structure.imported(module, broken)}
    assert any("inference.settings" in circle and "inference.pipeline" in circle
               for circle in structure.circles(broken))
    for module in modules.values():  # the shared fixture as it was
        module.imports = {target for target, _ in structure.imported(module, modules)}


def test_the_environment_is_read_in_the_settings_module_only(modules):
    readers = {name: structure.environment_reads(module) for name, module in modules.items()
               if name.startswith("inference") and name != structure.SETTINGS_MODULE}
    assert {name: lines for name, lines in readers.items() if lines} == {}
    assert structure.environment_reads(fake("inference.x", "import os\nos.environ.get('A')\nos.getenv('B')\n")) == [2,
                                                                                                                   3]


def test_every_variable_the_engine_reads_is_listed_and_documented():
    source = (REPO / "inference" / "settings.py").read_text() + (REPO / "predict.sh").read_text() + \
        (REPO / "flare_common" / "digests.py").read_text()
    documented = (REPO / "docs" / "settings.md").read_text()
    for name in ENVIRONMENT_VARIABLES:
        assert name in source, name
        assert f"`{name}`" in documented, name
    shell = set(re.findall(r"\$\{([A-Z_]+)", (REPO / "predict.sh").read_text()))
    assert shell and shell <= set(ENVIRONMENT_VARIABLES), shell - set(ENVIRONMENT_VARIABLES)


def test_no_argument_namespace_below_the_command_line(modules):
    readers = {name: structure.argument_reads(module) for name, module in modules.items()
               if name.startswith("inference")}
    assert {name: reads for name, reads in readers.items() if reads} == {}
    assert structure.argument_reads(fake("inference.x", "def helper(args):\n    return args.model\n")) == [(2, "helper")]


def test_tooling_takes_only_public_names_from_the_engine(modules):
    used = {module.name: structure.private_uses(module, modules) for module in structure.tooling_modules(modules)}
    assert {name: uses for name, uses in used.items() if uses} == {}
    sneaky = fake("benchmarks.x", "from inference.network_plan import out_of_memory_attempts\n"
                                  "from inference import io\nio.PARTIAL_PREFIX\n")
    assert structure.private_uses(sneaky, modules) == [(1, "inference.network_plan.out_of_memory_attempts"),
                                                       (3, "inference.io.PARTIAL_PREFIX")]


def test_settings_cannot_change_under_a_run():
    settings = PredictionSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.step_size = 0.7
    assert dataclasses.replace(settings, step_size=0.7).step_size == 0.7 and settings.step_size == 0.5
    options = RunOptions(Path("in"), Path("out"), Path("model"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.backend = "torch"
    assert not options.on_ray and RunOptions(Path("in"), Path("out"), Path("m"), ray_address="").on_ray


def test_the_command_line_builds_typed_records_with_the_parsers_defaults():
    from inference import cli

    args = cli.build_parser().parse_args(["-i", "in", "-o", "out", "--ray", "--folds", "0", "1", "--tta"])
    options, given = cli.run_options_from_args(args), cli.settings_from_args(args)
    assert options.ray_address == "" and options.folds == ("0", "1")
    assert options.backend is None  # no --backend: the model's calibration record's, else auto (cli.run)
    assert "patch_scale" not in given and "step_size" not in given  # no flag: the calibration decides
    assert PredictionSettings(**given) == dataclasses.replace(PredictionSettings(), tta=True)
    given = cli.settings_from_args(cli.build_parser().parse_args(["-i", "in", "-o", "out", "--patch-scale", "1.5"]))
    assert given["patch_scale"] == 1.5
