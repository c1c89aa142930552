"""The chart grants the operator exactly what its code uses: no wildcard, no secret, no extra.

The expected rights are read from the operator's source, not copied from the chart: every
Kubernetes client call in spotrun_operator, every resource a kopf handler is registered on,
and what kopf itself needs. A new API call in the operator fails
test_the_chart_grants_exactly_what_the_operator_code_uses until the chart grants it (and a
right the code stopped using fails it too).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_chart_render import NON_DEFAULT, of_kind, render

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "spotrun_operator"
TRAINJOBS = ("spotrun.dev", "trainjobs")

Right = tuple[str, str, str]  # (apiGroup, resource, verb)

# The kubernetes client classes the operator may use; another one needs a row below.
CLIENT_CLASSES = {"CoreV1Api", "AppsV1Api", "RbacAuthorizationV1Api", "CustomObjectsApi"}
VERB_OF_PREFIX = {
    "create": "create",
    "patch": "patch",
    "delete": "delete",
    "read": "get",
    "get": "get",
    "list": "list",
    "replace": "update",
}
# The object part of a client method name (after `<verb>_namespaced_`) -> (group, resource).
RESOURCE_OF_METHOD = {
    "stateful_set": ("apps", "statefulsets"),
    "service": ("", "services"),
    "service_account": ("", "serviceaccounts"),
    "role": ("rbac.authorization.k8s.io", "roles"),
    "role_binding": ("rbac.authorization.k8s.io", "rolebindings"),
    "pod": ("", "pods"),
    "event": ("", "events"),
    "custom_object": TRAINJOBS,
    "custom_object_status": ("spotrun.dev", "trainjobs/status"),
}
# The resource a kopf decorator names -> (group, resource).
RESOURCE_OF_SELECTOR = {
    '"pods"': ("", "pods"),
    '"nodes"': ("", "nodes"),
    '"statefulsets.apps"': ("apps", "statefulsets"),
    "names.GROUP": TRAINJOBS,
}
CLUSTER_SCOPED = {
    ("", "nodes"),
    ("", "namespaces"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
}


def operator_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(OPERATOR.rglob("*.py"))}


def client_call_rights(sources: dict[Path, str]) -> set[Right]:
    rights: set[Right] = set()
    for path, text in sources.items():
        for cls in re.findall(r"client\.(\w+Api)\(", text):
            assert cls in CLIENT_CLASSES, f"{path.name} uses client.{cls}: add its calls here"
        for method in re.findall(r"self\.(?:core|apps|rbac|custom)\.(\w+)", text):
            verb, _, rest = method.partition("_")
            obj = rest.removeprefix("namespaced_")
            assert verb in VERB_OF_PREFIX and obj in RESOURCE_OF_METHOD, (
                f"{path.name} calls {method}: map it in RESOURCE_OF_METHOD and grant it in "
                "charts/spotrun/templates/_helpers.tpl"
            )
            group, resource = RESOURCE_OF_METHOD[obj]
            rights.add((group, resource, VERB_OF_PREFIX[verb]))
    return rights


def kopf_handler_rights(sources: dict[Path, str]) -> set[Right]:
    """What kopf does for the handlers registered in the operator."""
    rights: set[Right] = set()
    for path, text in sources.items():
        for decorator, selector in re.findall(r"@kopf\.([\w.]+)\(\s*([^,)\s]+)", text):
            if decorator in ("on.startup", "on.cleanup", "on.probe", "on.login"):
                continue
            assert selector in RESOURCE_OF_SELECTOR, f"{path.name}: @kopf.{decorator}({selector}"
            group, resource = RESOURCE_OF_SELECTOR[selector]
            rights |= {(group, resource, "list"), (group, resource, "watch")}
            if decorator not in ("index", "on.event"):
                # Daemons, timers and change handlers: kopf patches the object (finalizer,
                # progress and diff-base annotations).
                rights.add((group, resource, "patch"))
        if "kopf.event(" in text:
            rights.add(("", "events", "create"))
        if "kopf.adopt(" in text:
            # ownerReferences with blockOwnerDeletion: the OwnerReferencesPermissionEnforcement
            # admission plugin requires `update` on the owner's finalizers for that.
            rights.add(("spotrun.dev", "trainjobs/finalizers", "update"))
    return rights


def kopf_framework_rights(*, namespaced: bool) -> set[Right]:
    rights = {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    if namespaced:  # kopf follows the served namespaces only when it is not cluster-wide
        rights |= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    return rights


def expected_rights(*, namespaced: bool) -> set[Right]:
    sources = operator_sources()
    return (
        client_call_rights(sources)
        | kopf_handler_rights(sources)
        | kopf_framework_rights(namespaced=namespaced)
    )


def flatten(rules: list[dict[str, Any]]) -> set[Right]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def granted(objs: list[dict[str, Any]]) -> dict[tuple[str, str | None], set[Right]]:
    """Rights per (kind, namespace) of the Roles and ClusterRoles rendered."""
    out: dict[tuple[str, str | None], set[Right]] = {}
    for obj in objs:
        if obj["kind"] in ("Role", "ClusterRole"):
            key = (obj["kind"] + "/" + obj["metadata"]["name"], obj["metadata"].get("namespace"))
            out[key] = flatten(obj["rules"])
    return out


@pytest.mark.parametrize("namespaced", [False, True], ids=["all-namespaces", "watch-namespaces"])
def test_the_chart_grants_exactly_what_the_operator_code_uses(namespaced: bool) -> None:
    values = {"watchNamespaces": ["team-a", "team-b"]} if namespaced else {}
    rights = granted(render(values))
    want = expected_rights(namespaced=namespaced)
    cluster = rights.pop(("ClusterRole/rel-spotrun-cluster", None))
    assert cluster == {r for r in want if r[:2] in CLUSTER_SCOPED}
    namespaced_want = {r for r in want if r[:2] not in CLUSTER_SCOPED}
    if namespaced:
        assert rights == {
            ("Role/rel-spotrun-jobs", "team-a"): namespaced_want,
            ("Role/rel-spotrun-jobs", "team-b"): namespaced_want,
        }
    else:
        assert rights == {("ClusterRole/rel-spotrun-jobs", None): namespaced_want}


def test_the_expected_rights_cover_the_calls_the_reconcile_loop_makes() -> None:
    """A guard on the parser above: it must find the calls we know the operator makes."""
    want = expected_rights(namespaced=False)
    assert {
        ("spotrun.dev", "trainjobs/status", "patch"),
        ("apps", "statefulsets", "create"),
        ("", "pods", "delete"),
        ("", "nodes", "watch"),
        ("rbac.authorization.k8s.io", "roles", "create"),
    } <= want


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_no_rule_has_a_wildcard_or_names_secrets_or_escalation_verbs(
    values: dict[str, Any],
) -> None:
    roles = of_kind(render(values), "Role") + of_kind(render(values), "ClusterRole")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], (role["metadata"]["name"], rule)
                assert not any("*" in item for item in rule[field]), (
                    role["metadata"]["name"],
                    rule,
                )
            assert "secrets" not in rule["resources"], (role["metadata"]["name"], rule)
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            assert "nonResourceURLs" not in rule


def test_the_operator_holds_every_right_it_grants_to_a_job_runtime() -> None:
    """RBAC refuses a Role granting what its creator does not hold (escalation prevention)."""
    children = pytest.importorskip("spotrun_operator.children")
    job = {
        "apiVersion": "spotrun.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "0000"},
        "spec": {"trainer": {"image": "x", "command": ["python"]}},
    }
    runtime_rights = flatten(children.role(job)["rules"])
    assert runtime_rights
    for namespaced in (False, True):
        values = {"watchNamespaces": ["team-a"]} if namespaced else {}
        jobs_role = next(
            o
            for o in render(values)
            if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"] == "rel-spotrun-jobs"
        )
        assert runtime_rights <= flatten(jobs_role["rules"])
