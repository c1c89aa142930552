"""The CRD has one source (crds/); its copies must be byte-for-byte the same."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "crds" / "trainjobs.spotrun.dev.yaml"
COPIES = [
    ROOT / "runtime" / "spotrun" / "crd" / "trainjobs.spotrun.dev.yaml",
    ROOT / "charts" / "spotrun" / "crds" / "trainjobs.spotrun.dev.yaml",
]


@pytest.mark.parametrize("copy", COPIES, ids=[str(c.relative_to(ROOT)) for c in COPIES])
def test_copy_matches_the_source(copy: Path) -> None:
    if not copy.exists() and "charts" in copy.parts:
        pytest.skip("the Helm chart does not carry the CRD yet")
    assert copy.read_bytes() == SOURCE.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from crds/trainjobs.spotrun.dev.yaml: "
        f"edit the source and copy it: cp {SOURCE.relative_to(ROOT)} {copy.relative_to(ROOT)}"
    )


def test_the_installed_package_reads_its_own_copy() -> None:
    from spotrun.local.trainjob import crd

    assert crd()["metadata"]["name"] == "trainjobs.spotrun.dev"
