"""The Helm chart installs into a Pod Security "restricted" namespace and its RBAC is just enough.

KWOK runs no containers, so the operator itself runs here as a local process, exactly as the
chart's Deployment would run it: the Deployment's command, arguments and environment, with
the credentials of the chart's ServiceAccount (a token from the TokenRequest API in a
kubeconfig of its own). Only the listening addresses change, to free local ports. That it
reconciles a TrainJob shows the RBAC suffices; `kubectl auth can-i` as the same account shows
it is not wider. Admission of the operator pod itself is shown twice: a server-side dry-run
of a Pod built from the installed Deployment's template, and the pod its ReplicaSet creates.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotrun.local.ports import free_port
from tests.fixtures.cluster import Cluster, KubectlError, wait_until
from tests.unit.test_chart_render import CHART, DIGEST, render, set_args

PSS_RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
TRAINER_IMAGE = "registry.k8s.io/pause:3.10"
CRD = "trainjobs.spotrun.dev"


# -- helpers -----------------------------------------------------------------------------------


def get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def create_namespace(cluster: Cluster, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    if labels:
        cluster.kubectl("label", "namespace", name, *[f"{k}={v}" for k, v in labels.items()])
    wait_until(
        f"ServiceAccount default in {name}",
        lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
        timeout=60,
    )
    return name


def delete_namespace(cluster: Cluster, name: str) -> None:
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@dataclass
class Release:
    cluster: Cluster
    name: str
    namespace: str
    home: Path

    def helm(self, *args: str) -> str:
        env = {
            **os.environ,
            "KUBECONFIG": self.cluster.kubeconfig,
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        proc = subprocess.run(
            [self.cluster.bin("helm"), *args, f"--namespace={self.namespace}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def install(self, values: dict[str, Any]) -> None:
        self.helm("install", self.name, str(CHART), *set_args(values), "--wait", "--timeout=3m")

    def upgrade(self, values: dict[str, Any]) -> None:
        self.helm("upgrade", self.name, str(CHART), *set_args(values), "--wait", "--timeout=3m")

    def uninstall(self) -> None:
        self.helm("uninstall", self.name, "--wait", "--timeout=3m")

    def installed(self) -> bool:
        releases = json.loads(self.helm("list", "--output=json"))
        return any(r["name"] == self.name for r in releases)

    @property
    def fullname(self) -> str:
        return self.name if "spotrun" in self.name else f"{self.name}-spotrun"

    def deployment(self) -> dict[str, Any]:
        return dict(get_json(self.cluster, "deployment", self.fullname, "-n", self.namespace))

    def service_account_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that authenticates as the chart's ServiceAccount (TokenRequest API)."""
        sa = self.deployment()["spec"]["template"]["spec"]["serviceAccountName"]
        token = self.cluster.kubectl(
            "create", "token", sa, "-n", self.namespace, "--duration=3600s"
        ).stdout.strip()
        admin = json.loads(
            self.cluster.kubectl(
                "config", "view", "--raw", "--minify", "--flatten", "-o", "json"
            ).stdout
        )
        server = dict(admin["clusters"][0]["cluster"])
        server.pop("insecure-skip-tls-verify", None)
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": server}],
            "users": [
                {"name": f"system:serviceaccount:{self.namespace}:{sa}", "user": {"token": token}}
            ],
            "contexts": [
                {
                    "name": "sa",
                    "context": {
                        "cluster": "c",
                        "user": f"system:serviceaccount:{self.namespace}:{sa}",
                    },
                }
            ],
            "current-context": "sa",
        }
        path.write_text(yaml.safe_dump(kubeconfig))
        path.chmod(0o600)
        return path


def can_i(cluster: Cluster, kubeconfig: Path, *args: str) -> bool:
    """`kubectl auth can-i ARGS` asked by the holder of KUBECONFIG itself."""
    proc = subprocess.run(
        [cluster.bin("kubectl"), f"--kubeconfig={kubeconfig}", "auth", "can-i", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {args}: {proc.stdout}{proc.stderr}"
    return answer == "yes"


@contextlib.contextmanager
def operator_process(release: Release, kubeconfig: Path, log: Path) -> Iterator[int]:
    """Runs the Deployment's container locally as the chart's ServiceAccount; yields its health port.

    Only the listening addresses change (free ports on 127.0.0.1); command, arguments and
    environment are the installed Deployment's.
    """
    (c,) = release.deployment()["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "spotrun_operator"]
    health, metrics = free_port(), free_port()
    args = []
    for arg in c["args"]:
        if arg.startswith("--liveness="):
            arg = f"--liveness=http://127.0.0.1:{health}/healthz"
        elif arg.startswith("--metrics-address="):
            arg = f"--metrics-address=127.0.0.1:{metrics}"
        args.append(arg)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "SPOTRUN_"))}
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    env["KUBECONFIG"] = str(kubeconfig)
    env["TMPDIR"] = str(log.parent)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spotrun_operator", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
        )
        try:
            yield health
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def healthz(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return bool(response.status == 200)


def trainjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "spotrun.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "trainer": {"image": TRAINER_IMAGE, "command": ["python", "train.py"]},
            "checkpoint": {"storage": "file:///shared/checkpoints"},
        },
    }


def reconciles_a_trainjob(cluster: Cluster, namespace: str, name: str) -> None:
    """Submits a TrainJob in NAMESPACE and waits for the operator's children and status."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(trainjob(name)))
    wait_until(
        f"StatefulSet {namespace}/{name}",
        lambda: (
            cluster.kubectl("get", "statefulset", name, "-n", namespace, check=False).returncode
            == 0
        ),
        timeout=90,
    )
    # The per-job runtime RBAC: creating it needs the operator to hold trainjobs/status patch.
    for kind in ("serviceaccount", "role", "rolebinding"):
        cluster.kubectl("get", kind, f"{name}-runtime", "-n", namespace)
    # The status write (trainjobs/status patch) went through.
    wait_until(
        f"status.state of TrainJob {namespace}/{name}",
        lambda: get_json(cluster, "trainjob", name, "-n", namespace).get("status", {}).get("state"),
        timeout=60,
    )


def delete_trainjob(cluster: Cluster, namespace: str, name: str) -> None:
    """Deletes the TrainJob while the operator runs: kopf removes its finalizer."""
    cluster.kubectl("delete", "trainjob", name, "-n", namespace, "--wait=false")
    wait_until(
        f"TrainJob {namespace}/{name} to be gone",
        lambda: (
            "NotFound"
            in cluster.kubectl("get", "trainjob", name, "-n", namespace, check=False).stderr
        ),
        timeout=60,
    )


RBAC_REFUSAL = re.compile(r'is forbidden: User \\*"system:serviceaccount:|Not enough permissions')


def assert_no_rbac_refusal(log: Path) -> None:
    """No RBAC refusal in the operator's log.

    kopf logs "Not enough permissions" when it may not list or watch and falls back; a call
    RBAC refused carries the API server's `... is forbidden: User "system:serviceaccount:..."
    cannot ...` (quotes escaped in JSON logs). Other 403s, such as creating in a namespace
    being deleted, are not about RBAC.
    """
    text = log.read_text(errors="replace")
    found = RBAC_REFUSAL.search(text)
    assert found is None, (
        f"the operator was refused something:\n{text[found.start() - 2000 : found.end() + 500]}"
    )


# -- one release, installed once for the tests of this module -----------------------------------


@pytest.fixture(scope="module")
def release(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart installed (image by digest, all namespaces) in a restricted namespace."""
    namespace = create_namespace(cluster, "t-chart-restricted", PSS_RESTRICTED)
    r = Release(cluster, f"sr-{namespace[-6:]}", namespace, tmp_path_factory.mktemp("helm"))
    try:
        r.install({"image": {"repository": "example.com/spotrun/operator", "digest": DIGEST}})
        yield r
    finally:
        if r.installed():
            r.uninstall()
        delete_namespace(cluster, namespace)


def test_the_operator_pod_is_admitted_in_a_restricted_namespace(
    cluster: Cluster, release: Release
) -> None:
    deployment = release.deployment()
    template = deployment["spec"]["template"]
    assert template["spec"]["containers"][0]["image"] == f"example.com/spotrun/operator@{DIGEST}"

    # A Pod of exactly the Deployment's template passes admission (server-side dry run).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "admission-check", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }
    created = cluster.kubectl(
        "create", "--dry-run=server", "-n", release.namespace, "-f", "-", input=json.dumps(pod)
    )
    assert "created (server dry run)" in created.stdout

    # The namespace does enforce: the same pod with privilege escalation allowed is refused.
    bad = json.loads(json.dumps(pod))
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    with pytest.raises(KubectlError) as refused:
        cluster.kubectl(
            "create", "--dry-run=server", "-n", release.namespace, "-f", "-", input=json.dumps(bad)
        )
    assert 'violates PodSecurity "restricted:latest"' in refused.value.stderr
    assert "allowPrivilegeEscalation != false" in refused.value.stderr

    # The ReplicaSet did create the operator pod; a violation would be a FailedCreate event.
    selector = ",".join(
        f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items()
    )
    pods = wait_until(
        "the operator pod",
        lambda: get_json(cluster, "pods", "-n", release.namespace, "-l", selector)["items"],
        timeout=60,
    )
    assert pods[0]["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    events = get_json(
        cluster, "events", "-n", release.namespace, "--field-selector=reason=FailedCreate"
    )
    assert events["items"] == []


def test_the_chart_service_account_reconciles_a_trainjob(
    cluster: Cluster, release: Release, tmp_path: Path
) -> None:
    kubeconfig = release.service_account_kubeconfig(tmp_path / "sa.kubeconfig")
    # The TrainJob lives in a namespace of its own: the chart serves every namespace.
    jobs = create_namespace(cluster, "t-chart-jobs")
    log = tmp_path / "operator.log"
    try:
        with operator_process(release, kubeconfig, log) as health:
            wait_until("the operator's /healthz", lambda: healthz(health), timeout=60)
            reconciles_a_trainjob(cluster, jobs, "demo")
            delete_trainjob(cluster, jobs, "demo")
        assert_no_rbac_refusal(log)
    finally:
        delete_namespace(cluster, jobs)


def test_the_chart_service_account_can_do_no_more_than_the_operator_needs(
    cluster: Cluster, release: Release, tmp_path: Path
) -> None:
    kc = release.service_account_kubeconfig(tmp_path / "sa.kubeconfig")
    ns = release.namespace
    allowed = [
        ("patch", "trainjobs.spotrun.dev", "--subresource=status", "-n", ns),
        ("create", "statefulsets.apps", "-n", ns),
        ("delete", "pods", "-n", ns),
        ("create", "roles.rbac.authorization.k8s.io", "-n", ns),
        ("list", "nodes"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    for args in allowed:
        assert can_i(cluster, kc, *args), f"the operator needs: can-i {' '.join(args)}"
    # (`TYPE/NAME` is a name to can-i: subresources go through --subresource.)
    refused = [
        ("get", "secrets", "-n", ns),
        ("list", "secrets", "--all-namespaces"),
        ("get", "configmaps", "-n", ns),
        ("create", "pods", "-n", ns),
        ("create", "pods", "--subresource=exec", "-n", ns),
        ("create", "pods", "--subresource=eviction", "-n", ns),
        ("delete", "nodes"),
        ("patch", "nodes"),
        ("get", "nodes"),
        ("delete", "statefulsets.apps", "-n", ns),
        ("update", "deployments.apps", "-n", ns),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io", "-n", ns),
        ("bind", "roles.rbac.authorization.k8s.io", "-n", ns),
        ("impersonate", "serviceaccounts", "-n", ns),
        ("create", "serviceaccounts", "--subresource=token", "-n", ns),
        ("update", "trainjobs.spotrun.dev", "-n", ns),
        ("list", "namespaces"),  # cluster-wide, kopf does not follow namespaces
    ]
    for args in refused:
        assert not can_i(cluster, kc, *args), f"the operator must not: can-i {' '.join(args)}"


# -- upgrade to watchNamespaces, then uninstall --------------------------------------------------

KINDS_IN_NAMESPACES = (
    "deployments.apps",
    "replicasets.apps",
    "pods",
    "services",
    "serviceaccounts",
    "poddisruptionbudgets.policy",
    "roles.rbac.authorization.k8s.io",
    "rolebindings.rbac.authorization.k8s.io",
    "configmaps",
    "secrets",
)
CLUSTER_KINDS = (
    "clusterroles.rbac.authorization.k8s.io",
    "clusterrolebindings.rbac.authorization.k8s.io",
)


def leftovers(cluster: Cluster, release: Release, namespaces: list[str]) -> list[str]:
    """Every object of the release (chart-made or derived: ReplicaSet, Pod, EndpointSlice)."""
    instance = f"app.kubernetes.io/instance={release.name}"
    found = []
    for namespace in namespaces:
        for kind in KINDS_IN_NAMESPACES:
            items = get_json(cluster, kind, "-n", namespace, "-l", instance)["items"]
            found += [f"{kind} {namespace}/{o['metadata']['name']}" for o in items]
        slices = get_json(
            cluster,
            "endpointslices.discovery.k8s.io",
            "-n",
            namespace,
            "-l",
            f"kubernetes.io/service-name={release.fullname}-metrics",
        )["items"]
        found += [f"endpointslice {namespace}/{o['metadata']['name']}" for o in slices]
    # Helm's own record of the release.
    helm_secrets = get_json(
        cluster, "secrets", "-n", release.namespace, "-l", f"owner=helm,name={release.name}"
    )["items"]
    found += [f"helm release {o['metadata']['name']}" for o in helm_secrets]
    for kind in CLUSTER_KINDS:
        items = get_json(cluster, kind, "-l", instance)["items"]
        found += [f"{kind} {o['metadata']['name']}" for o in items]
    return found


def test_upgrade_to_watch_namespaces_then_uninstall_leaves_only_the_crd(
    cluster: Cluster, tmp_path: Path
) -> None:
    home = create_namespace(cluster, "t-chart-upgrade", PSS_RESTRICTED)
    served = create_namespace(cluster, "t-chart-served")
    other = create_namespace(cluster, "t-chart-other")
    release = Release(cluster, f"sr-{home[-6:]}", home, tmp_path / "helm")
    try:
        release.install({})
        kinds = {o["kind"] for o in render(release=release.name, namespace=home)}
        assert kinds == {
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
        }
        assert leftovers(cluster, release, [home, served])  # the check sees the release

        release.upgrade({"watchNamespaces": [served]})
        jobs_role = f"{release.fullname}-jobs"
        assert "NotFound" in cluster.kubectl("get", "clusterrole", jobs_role, check=False).stderr
        cluster.kubectl("get", "role", jobs_role, "-n", served)
        cluster.kubectl("get", "rolebinding", jobs_role, "-n", served)
        (c,) = release.deployment()["spec"]["template"]["spec"]["containers"]
        assert f"--namespace={served}" in c["args"] and "--all-namespaces" not in c["args"]

        kubeconfig = release.service_account_kubeconfig(tmp_path / "sa.kubeconfig")
        assert can_i(cluster, kubeconfig, "list", "pods", "-n", served)
        assert not can_i(cluster, kubeconfig, "list", "pods", "-n", other)
        assert not can_i(cluster, kubeconfig, "patch", "trainjobs.spotrun.dev", "-n", other)
        assert not can_i(cluster, kubeconfig, "list", "pods", "--all-namespaces")
        log = tmp_path / "operator.log"
        with operator_process(release, kubeconfig, log) as health:
            wait_until("the operator's /healthz", lambda: healthz(health), timeout=60)
            reconciles_a_trainjob(cluster, served, "served")
            delete_trainjob(cluster, served, "served")
        assert_no_rbac_refusal(log)

        release.uninstall()
        wait_until(
            "every object of the release to be gone",
            lambda: not leftovers(cluster, release, [home, served]),
            timeout=120,
        )
        # Helm keeps the CRDs of a chart's crds/ folder on uninstall, by design: deleting the
        # CRD would delete every TrainJob of every namespace with it.
        cluster.kubectl("get", "crd", CRD)
    finally:
        if release.installed():
            release.uninstall()
        for namespace in (home, served, other):
            delete_namespace(cluster, namespace)


# -- values the operator acts on ------------------------------------------------------------------

OPERATOR_SOURCES = Path(__file__).resolve().parents[2] / "operator" / "spotrun_operator"
STORAGE_ENV = "SPOTRUN_DEFAULT_STORAGE"
GCP_SERVICE_ACCOUNT_ENV = "SPOTRUN_RUNTIME_GCP_SERVICE_ACCOUNT"


def operator_reads(env_name: str) -> bool:
    return any(env_name in p.read_text() for p in OPERATOR_SOURCES.rglob("*.py"))


def test_default_storage_and_workload_identity_reach_each_job(
    cluster: Cluster, tmp_path: Path
) -> None:
    """defaultCheckpointStorage and workloadIdentity.gcpServiceAccount, through the operator.

    The chart hands both to the operator as environment variables; each half of this test
    runs once the operator reads its variable (until then it is reported as skipped).
    """
    checked = {env: operator_reads(env) for env in (STORAGE_ENV, GCP_SERVICE_ACCOUNT_ENV)}
    if not any(checked.values()):
        pytest.skip(f"the operator reads neither {STORAGE_ENV} nor {GCP_SERVICE_ACCOUNT_ENV} yet")
    home = create_namespace(cluster, "t-chart-values", PSS_RESTRICTED)
    served = create_namespace(cluster, "t-chart-values-jobs")
    release = Release(cluster, f"sr-{home[-6:]}", home, tmp_path / "helm")
    storage = "gs://ckpt-bucket/spotrun"
    gsa = "trainer@my-project.iam.gserviceaccount.com"
    try:
        release.install(
            {
                "watchNamespaces": [served],
                "defaultCheckpointStorage": storage,
                "workloadIdentity": {"gcpServiceAccount": gsa},
            }
        )
        job = trainjob("defaults")
        del job["spec"]["checkpoint"]
        kubeconfig = release.service_account_kubeconfig(tmp_path / "sa.kubeconfig")
        log = tmp_path / "operator.log"
        with operator_process(release, kubeconfig, log) as health:
            wait_until("the operator's /healthz", lambda: healthz(health), timeout=60)
            cluster.kubectl("apply", "-n", served, "-f", "-", input=json.dumps(job))
            sts = wait_until(
                "the job's StatefulSet",
                lambda: get_json(cluster, "statefulset", "defaults", "-n", served),
                timeout=90,
            )
            account = wait_until(
                "the job's runtime ServiceAccount",
                lambda: get_json(cluster, "serviceaccount", "defaults-runtime", "-n", served),
                timeout=60,
            )
            if checked[STORAGE_ENV]:
                (trainer,) = [
                    c
                    for c in sts["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "trainer"
                ]
                env = {e["name"]: e.get("value") for e in trainer.get("env", [])}
                assert env["SPOTRUN_STORAGE"] == storage
            if checked[GCP_SERVICE_ACCOUNT_ENV]:
                annotations = account["metadata"].get("annotations", {})
                assert annotations.get("iam.gke.io/gcp-service-account") == gsa
            delete_trainjob(cluster, served, "defaults")
        assert_no_rbac_refusal(log)
        release.uninstall()
    finally:
        if release.installed():
            release.uninstall()
        for namespace in (home, served):
            delete_namespace(cluster, namespace)
    unchecked = [env for env, done in checked.items() if not done]
    if unchecked:
        pytest.skip(f"checked the rest; the operator does not read {unchecked} yet")
