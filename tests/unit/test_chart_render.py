"""The Helm chart (charts/spotrun) lints, renders what it promises, and refuses bad values.

Rendering goes through the pinned helm binary (`hack/cluster bin helm`), offline; the tests
read the rendered objects, not the templates. The helpers here are shared by the other
test_chart_* modules and by tests/cluster/test_chart_install.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.cluster import hack_cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "spotrun"
# The chart declares kubeVersion >=1.28 (the pod-index label). The pinned helm renders for
# Kubernetes 1.37 without it (test_helm_renders_for_the_kubernetes_it_is_built_with); the
# tests say so anyway, as a user rendering for a given cluster would.
KUBE_VERSION = "1.37.0"
DIGEST = "sha256:" + "0123456789abcdef" * 4


@cache
def helm_bin() -> str:
    return hack_cluster("bin", "helm").strip()


def helm(
    *args: str, check: bool = True, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the pinned helm with its config, cache and data dirs kept out of the user's home."""
    base = home or (ROOT / ".pytest_cache" / "helm")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(base / "cache"),
        "HELM_CONFIG_HOME": str(base / "config"),
        "HELM_DATA_HOME": str(base / "data"),
    }
    proc = subprocess.run(
        [helm_bin(), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def set_args(values: dict[str, Any] | None) -> list[str]:
    """`--set-json key=value` for each top-level value (exact types, lists included)."""
    return [f"--set-json={k}={json.dumps(v)}" for k, v in (values or {}).items()]


def render(
    values: dict[str, Any] | None = None,
    release: str = "rel",
    namespace: str = "spotrun-system",
    include_crds: bool = False,
) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` renders them with VALUES."""
    args = ["template", release, str(CHART), f"--namespace={namespace}"]
    args += [f"--kube-version={KUBE_VERSION}", *set_args(values)]
    if include_crds:
        args.append("--include-crds")
    out = helm(*args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(values: dict[str, Any]) -> str:
    """helm's error output for VALUES that must not render."""
    proc = helm(
        "template",
        "rel",
        str(CHART),
        f"--kube-version={KUBE_VERSION}",
        *set_args(values),
        check=False,
    )
    assert proc.returncode != 0, f"rendered although it should not have: {values}"
    return proc.stderr


def of_kind(objs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return dict(containers[0])


def env_of(objs: Iterable[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(objs)["env"]}


# -- lint ------------------------------------------------------------------------------------

NON_DEFAULT = {
    "image": {"repository": "europe-docker.pkg.dev/p/r/spotrun-operator", "digest": DIGEST},
    "watchNamespaces": ["team-a", "team-b"],
    "defaultCheckpointStorage": "gs://ckpt-bucket/spotrun",
    "workloadIdentity": {"gcpServiceAccount": "trainer@my-project.iam.gserviceaccount.com"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "podDisruptionBudget": {"enabled": False},
    "operator": {"logFormat": "plain", "verbose": True, "resyncSeconds": 30},
    "priorityClassName": "system-cluster-critical",
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}
    ],
}


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_chart_passes_helm_lint_strict(values: dict[str, Any]) -> None:
    proc = helm("lint", "--strict", str(CHART), f"--kube-version={KUBE_VERSION}", *set_args(values))
    assert "0 chart(s) failed" in proc.stdout


def test_helm_renders_for_the_kubernetes_it_is_built_with() -> None:
    """`helm template` with no --kube-version renders for k8s.io/client-go's version (1.37),
    as a released helm does: not for v1.20, which the chart's kubeVersion (>=1.28) refuses."""
    proc = helm("template", "rel", str(CHART), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "incompatible with Kubernetes" not in proc.stderr
    assert [d["kind"] for d in yaml.safe_load_all(proc.stdout) if d].count("Deployment") == 1
    lint = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout


# -- what renders ------------------------------------------------------------------------------


def test_default_values_render_the_operator_and_its_cluster_wide_rbac() -> None:
    objs = render()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == [
        ("ClusterRole", "rel-spotrun-cluster"),
        ("ClusterRole", "rel-spotrun-jobs"),
        ("ClusterRoleBinding", "rel-spotrun-cluster"),
        ("ClusterRoleBinding", "rel-spotrun-jobs"),
        ("Deployment", "rel-spotrun"),
        ("PodDisruptionBudget", "rel-spotrun"),
        ("Service", "rel-spotrun-metrics"),
        ("ServiceAccount", "rel-spotrun"),
    ]
    assert "--all-namespaces" in container(objs)["args"]
    for obj in objs:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "spotrun-system", obj["metadata"]["name"]


def test_the_operator_runs_as_one_replica_replaced_with_recreate() -> None:
    spec = one(render(), "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_the_pod_meets_pod_security_restricted_with_a_read_only_root() -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    # The only writable place is /tmp, an emptyDir (a volume type "restricted" allows).
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert "emptyDir" in pod["volumes"][0]
    assert {"name": "TMPDIR", "value": "/tmp"} in c["env"]


def test_the_pod_runs_the_operator_module_with_probes_and_ports() -> None:
    c = container(render())
    assert c["command"] == ["python", "-m", "spotrun_operator"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert "--metrics-address=0.0.0.0:9090" in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9090, "health": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_the_operator_module_accepts_the_arguments_the_chart_passes() -> None:
    """The Deployment's args must parse with the operator's own command line."""
    cli = pytest.importorskip("spotrun_operator.cli")
    for values in ({}, NON_DEFAULT):
        args = cli.parser().parse_args(container(render(values))["args"])
        assert args.metrics_address == "0.0.0.0:9090"
        assert args.liveness == "http://0.0.0.0:8080/healthz"
        assert args.namespace == values.get("watchNamespaces", [])


def test_resources_have_requests_and_limits() -> None:
    resources = container(render())["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]


def test_image_defaults_to_the_chart_app_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container(render())["image"] == f"ghcr.io/spotrun/operator:{app_version}"
    tagged = render({"image": {"repository": "example.com/op", "tag": "1.2.3"}})
    assert container(tagged)["image"] == "example.com/op:1.2.3"


def test_image_is_pulled_by_digest_when_one_is_given() -> None:
    objs = render({"image": {"repository": "example.com/op", "tag": "1.2.3", "digest": DIGEST}})
    assert container(objs)["image"] == f"example.com/op@{DIGEST}"


def test_watch_namespaces_render_a_role_in_each_namespace_and_no_cluster_wide_job_rights() -> None:
    objs = render({"watchNamespaces": ["team-a", "team-b"]})
    roles = of_kind(objs, "Role")
    bindings = of_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "rel-spotrun-jobs",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "rel-spotrun", "namespace": "spotrun-system"}
        ]
    assert [r["metadata"]["name"] for r in of_kind(objs, "ClusterRole")] == ["rel-spotrun-cluster"]
    args = container(objs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args


def test_default_storage_and_workload_identity_reach_the_operator_as_env() -> None:
    assert env_of(render())["SPOTRUN_DEFAULT_STORAGE"] == ""
    assert env_of(render())["SPOTRUN_RUNTIME_GCP_SERVICE_ACCOUNT"] == ""
    env = env_of(render(NON_DEFAULT))
    assert env["SPOTRUN_DEFAULT_STORAGE"] == "gs://ckpt-bucket/spotrun"
    assert (
        env["SPOTRUN_RUNTIME_GCP_SERVICE_ACCOUNT"] == "trainer@my-project.iam.gserviceaccount.com"
    )


def test_the_metrics_service_selects_the_operator_pod_and_its_metrics_port() -> None:
    objs = render()
    service = one(objs, "Service")
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert of_kind(render({"metrics": {"service": {"enabled": False}}}), "Service") == []


def test_the_service_monitor_is_optional_and_scrapes_the_metrics_service() -> None:
    assert of_kind(render(), "ServiceMonitor") == []
    objs = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    monitor = one(objs, "ServiceMonitor")
    service = one(objs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["spotrun-system"]}


def test_the_pdb_selects_the_operator_pod_and_lets_drains_through() -> None:
    objs = render()
    pdb = one(objs, "PodDisruptionBudget")
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert of_kind(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget") == []


def test_the_operator_prefers_nodes_that_are_not_spot() -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["preference"]["matchExpressions"] == [
        {"key": "cloud.google.com/gke-spot", "operator": "NotIn", "values": ["true"]}
    ]


def test_an_existing_service_account_is_bound_instead_of_created() -> None:
    objs = render({"serviceAccount": {"create": False, "name": "ops-sa"}})
    assert of_kind(objs, "ServiceAccount") == []
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-sa"
    for binding in of_kind(objs, "ClusterRoleBinding"):
        assert binding["subjects"][0]["name"] == "ops-sa"
    assert "serviceAccount.name is required" in render_error({"serviceAccount": {"create": False}})


# -- what does not render ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "at '/replicaCount': value must be 1"),
        ({"image": {"repository": "x", "digest": "sha256:abc"}}, "at '/image/digest'"),
        ({"image": {"repository": "x@sha256:" + "0" * 64}}, "at '/image/repository'"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"watchNamespaces": ["team-*"]}, "at '/watchNamespaces/0'"),
        ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
        ({"defaultCheckpointStorage": "/data/ckpt"}, "at '/defaultCheckpointStorage'"),
        (
            {"workloadIdentity": {"gcpServiceAccount": "trainer"}},
            "at '/workloadIdentity/gcpServiceAccount'",
        ),
        ({"podSecurityContext": {"runAsUser": 0}}, "at '/podSecurityContext/runAsUser'"),
        (
            {"securityContext": {"privileged": True}},
            "additional properties 'securityContext' not allowed",
        ),
        ({"operator": {"logFormat": "xml"}}, "at '/operator/logFormat'"),
        ({"metrics": {"port": 70000}}, "at '/metrics/port'"),
        (
            {"podDisruptionBudget": {"maxUnavailable": 2}},
            "at '/podDisruptionBudget/maxUnavailable'",
        ),
        (
            {"resources": {"requests": {"cpu": None}}},
            "at '/resources/requests': missing property 'cpu'",
        ),
        ({"watchNamspaces": ["a"]}, "additional properties 'watchNamspaces' not allowed"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_a_bad_value_fails_with_the_schema_message(values: dict[str, Any], message: str) -> None:
    error = render_error(values)
    assert "values don't meet the specifications of the schema" in error
    assert message in error


def test_a_service_monitor_without_the_metrics_service_fails_with_a_reason() -> None:
    error = render_error(
        {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    )
    assert "metrics.serviceMonitor.enabled needs metrics.service.enabled" in error
