"""Test tiers: every test gets the marker of the folder it lives in (unit, runtime, cluster, node,
gpu), and what the selected tiers run is built before the first test (outside its timeout)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every process a test starts (spotrun run, spotrun launch, the operator, workers) runs the
# checkout under test, whatever spotrun the interpreter has installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "runtime"), str(ROOT / "operator"), str(ROOT)]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.gcs"]

TIERS = ("unit", "runtime", "cluster", "node", "gpu")

# The pinned binaries each tier runs (hack/cluster build), and the Dockerfile's images the
# node tier runs (hack/images build, as root). A run of `-m unit` builds only helm.
CONTROL_PLANE = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
    "helm",
)
TIER_BINARIES = {
    "unit": ("helm",),
    "runtime": ("fake-gcs-server",),
    "cluster": CONTROL_PLANE,
    "node": (*CONTROL_PLANE, "kubelet", "coredns", "fake-gcs-server"),
}
NODE_IMAGES = ("operator", "runtime", "examples")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


def tiers_of(items: list[pytest.Item]) -> set[str]:
    return {tier for item in items for tier in TIERS if item.get_closest_marker(tier)}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds what the selected tests run, once, before any of them (a cold build is minutes:
    no test's timeout should count it). Output goes straight to the terminal.

    The binaries and the images build at the same time: Go's compiler keeps the CPUs busy,
    the images mostly wait on PyPI and the disk (a cold run: about 11 and 14 minutes).
    """
    if session.config.option.collectonly or not session.items:
        return
    tiers = tiers_of(session.items)
    binaries = sorted({b for tier in tiers for b in TIER_BINARIES.get(tier, ())})
    steps = []
    if binaries and not os.environ.get("SPOTRUN_TEST_KUBECONFIG"):
        steps.append([str(ROOT / "hack" / "cluster"), "build", *binaries])
    if "node" in tiers and os.geteuid() == 0:
        steps.append([str(ROOT / "hack" / "images"), "build", *NODE_IMAGES])
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        procs = [(cmd, subprocess.Popen(cmd)) for cmd in steps]
        failed = [(cmd, proc.wait()) for cmd, proc in procs]
    for cmd, rc in failed:
        if rc != 0:
            raise pytest.UsageError(f"`{' '.join(cmd)}` failed (exit {rc}); see its output above")
