"""The chart carries the TrainJob CRD byte for byte as crds/ has it, and hack/sync-crd keeps it so.

Helm installs the files of a chart's crds/ folder before anything else, and never upgrades or
deletes them (docs/install.md, "Upgrading the CRD"); the chart's copy must be the API's single
source, crds/trainjobs.spotrun.dev.yaml.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.unit.test_chart_render import CHART, render

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "crds" / "trainjobs.spotrun.dev.yaml"
SYNC = ROOT / "hack" / "sync-crd"


def test_the_chart_crd_is_the_source_crd_byte_for_byte() -> None:
    copy = CHART / "crds" / SOURCE.name
    assert copy.read_bytes() == SOURCE.read_bytes(), (
        "charts/spotrun/crds/ differs from crds/trainjobs.spotrun.dev.yaml: run hack/sync-crd"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [SOURCE.name]


def test_helm_renders_the_crd_from_the_chart() -> None:
    crds = [o for o in render(include_crds=True) if o["kind"] == "CustomResourceDefinition"]
    assert [c["metadata"]["name"] for c in crds] == ["trainjobs.spotrun.dev"]
    assert crds[0] == yaml.safe_load(SOURCE.read_text())


def test_no_template_renders_the_crd() -> None:
    """The CRD lives in crds/ only: as a template, `helm uninstall` would delete every TrainJob."""
    assert all(o["kind"] != "CustomResourceDefinition" for o in render())


def run_sync(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tree / "hack" / "sync-crd"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_sync_crd_detects_drift_and_repairs_every_copy(tmp_path: Path) -> None:
    (tmp_path / "hack").mkdir()
    shutil.copy2(SYNC, tmp_path / "hack" / "sync-crd")
    (tmp_path / "crds").mkdir()
    (tmp_path / "crds" / SOURCE.name).write_text("kind: CustomResourceDefinition # v2\n")
    copies = [
        tmp_path / "charts" / "spotrun" / "crds" / SOURCE.name,
        tmp_path / "runtime" / "spotrun" / "crd" / SOURCE.name,
    ]
    copies[0].parent.mkdir(parents=True)
    copies[0].write_text("kind: CustomResourceDefinition # v1\n")

    check = run_sync(tmp_path, "--check")
    assert check.returncode == 1
    assert "charts/spotrun/crds/" in check.stderr and "runtime/spotrun/crd/" in check.stderr

    assert run_sync(tmp_path).returncode == 0
    for copy in copies:
        assert copy.read_text() == "kind: CustomResourceDefinition # v2\n"
    assert run_sync(tmp_path, "--check").returncode == 0
