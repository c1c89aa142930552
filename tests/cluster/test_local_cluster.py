"""The test cluster behaves like a real one where spotrun relies on it.

These pin what later cluster tests take for granted: service-account tokens are issued; GPU
pods get scheduled onto spot nodes and run; the pods of a vanished node come back elsewhere;
an eviction leaves the DisruptionTarget condition that the operator reads to tell a
preemption from a failure; Helm installs and removes a chart.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.fixtures.cluster import Cluster, wait_until

GPU = "nvidia.com/gpu"
SPOT = {"cloud.google.com/gke-spot": "true"}
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
SA_ANNOTATION = "kubernetes.io/service-account.name"


def statefulset(
    name: str,
    replicas: int,
    node_selector: dict[str, str],
    one_per_node: bool = False,
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "nodeSelector": node_selector,
        "containers": [
            {
                "name": "trainer",
                "image": PAUSE_IMAGE,
                "resources": {"limits": {GPU: "1"}, "requests": {GPU: "1"}},
            }
        ],
    }
    if one_per_node:
        pod_spec["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {"app": name}},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def running_pods(cluster: Cluster, namespace: str, app: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"app={app}", "-o", "json").stdout
    return [
        p
        for p in json.loads(out)["items"]
        if p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
    ]


def get_json(cluster: Cluster, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return result


def test_api_server_answers_readyz(cluster: Cluster) -> None:
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_service_account_tokens_are_issued(cluster: Cluster, namespace: str) -> None:
    # TokenRequest (what projected pod tokens use) is signed by the API server's key ...
    token = cluster.kubectl("create", "token", "default", "-n", namespace).stdout.strip()
    assert token.count(".") == 2  # a JWT
    # ... and the controller-manager's token controller fills legacy token Secrets with its own.
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/service-account-token",
        "metadata": {"name": "default-token", "annotations": {SA_ANNOTATION: "default"}},
    }
    apply(cluster, namespace, secret)
    data = wait_until(
        "the token controller to fill Secret default-token",
        lambda: get_json(cluster, "secret", "default-token", "-n", namespace).get("data"),
        timeout=60,
    )
    assert {"token", "ca.crt", "namespace"} <= set(data)


def test_gpu_statefulset_runs_on_spot_gpu_nodes(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, statefulset("trainer", 3, SPOT))

    pods = wait_until(
        "3 Running trainer pods",
        lambda: (p := running_pods(cluster, namespace, "trainer")) and len(p) == 3 and p,
    )

    for pod in pods:
        node = get_json(cluster, "node", pod["spec"]["nodeName"])
        assert node["metadata"]["labels"]["cloud.google.com/gke-spot"] == "true"
        assert int(node["status"]["allocatable"][GPU]) >= 1
        if cluster.local:
            assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_pods_of_a_deleted_node_are_replaced_on_another_node(
    cluster: Cluster, namespace: str
) -> None:
    if not cluster.local:
        pytest.skip("deletes nodes: runs only on the local KWOK cluster")
    pool = {"spotrun.test/pool": namespace}
    nodes = [f"{namespace}-{i}" for i in range(3)]
    for node in nodes:
        cluster.add_node(node, gpus=8, labels=pool)
    try:
        apply(cluster, namespace, statefulset("trainer", 2, {**SPOT, **pool}, one_per_node=True))
        wait_until(
            "2 Running trainer pods", lambda: len(running_pods(cluster, namespace, "trainer")) == 2
        )
        before = get_json(cluster, "pod", "trainer-0", "-n", namespace)
        victim = before["spec"]["nodeName"]

        cluster.kubectl("delete", "node", victim)

        # The pod GC controller deletes pods bound to a node that no longer exists (after a
        # 40s quarantine); the StatefulSet controller then recreates trainer-0.
        def replaced() -> dict[str, Any] | None:
            pods = {p["metadata"]["name"]: p for p in running_pods(cluster, namespace, "trainer")}
            pod = pods.get("trainer-0")
            if pod and pod["metadata"]["uid"] != before["metadata"]["uid"]:
                return pod
            return None

        after = wait_until("trainer-0 to be replaced and Running", replaced, timeout=240)
        assert after["spec"]["nodeName"] != victim
        assert after["spec"]["nodeName"] in nodes
    finally:
        cluster.kubectl("delete", "node", *nodes, "--ignore-not-found", "--wait=false")


def test_eviction_marks_the_pod_as_a_disruption_target(cluster: Cluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "trainer",
            # KWOK finishes the pod's termination 5s after deletion, as a process that takes
            # 5s to stop after SIGTERM would.
            "annotations": {"pod-delete.stage.kwok.x-k8s.io/delay": "5s"},
        },
        "spec": {
            "nodeSelector": SPOT,
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {"name": "trainer", "image": PAUSE_IMAGE, "resources": {"limits": {GPU: "1"}}}
            ],
        },
    }
    apply(cluster, namespace, pod)
    wait_until(
        "pod trainer Running",
        lambda: (
            get_json(cluster, "pod", "trainer", "-n", namespace)["status"].get("phase") == "Running"
        ),
    )
    with cluster.api_client() as api_client:
        core = client.CoreV1Api(api_client)

        core.create_namespaced_pod_eviction(
            "trainer",
            namespace,
            client.V1Eviction(metadata=client.V1ObjectMeta(name="trainer", namespace=namespace)),
        )

        evicted = core.read_namespaced_pod("trainer", namespace)
        assert evicted.metadata is not None and evicted.status is not None
        assert evicted.metadata.deletion_timestamp is not None
        assert evicted.metadata.deletion_grace_period_seconds == 30
        conditions = {c.type: c for c in evicted.status.conditions or []}
        assert "DisruptionTarget" in conditions, conditions
        assert conditions["DisruptionTarget"].status == "True"
        assert conditions["DisruptionTarget"].reason == "EvictionByEvictionAPI"

        def gone() -> bool:
            names = [
                p.metadata.name for p in core.list_namespaced_pod(namespace).items if p.metadata
            ]
            return "trainer" not in names

        wait_until("the evicted pod to finish terminating", gone, timeout=60)


CHART = {
    "Chart.yaml": "apiVersion: v2\nname: tiny\nversion: 0.1.0\n",
    "values.yaml": "greeting: hello\n",
    "templates/configmap.yaml": """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-greeting
data:
  greeting: {{ .Values.greeting | quote }}
""",
    "templates/deployment.yaml": f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{{{ .Release.Name }}}}-web
spec:
  replicas: 1
  selector:
    matchLabels: {{app: {{{{ .Release.Name }}}}-web}}
  template:
    metadata:
      labels: {{app: {{{{ .Release.Name }}}}-web}}
    spec:
      containers:
      - name: web
        image: {PAUSE_IMAGE}
""",
}


def test_helm_installs_and_uninstalls_a_chart(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "tiny"
    for rel, text in CHART.items():
        (chart / rel).parent.mkdir(parents=True, exist_ok=True)
        (chart / rel).write_text(text)
    env = {
        **os.environ,
        "KUBECONFIG": cluster.kubeconfig,
        "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
        "HELM_DATA_HOME": str(tmp_path / "helm-data"),
    }

    def helm(*args: str) -> str:
        proc = subprocess.run(
            [cluster.bin("helm"), *args, "--namespace", namespace],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    helm("install", "demo", str(chart), "--set", "greeting=hi", "--wait", "--timeout=2m")

    configmap = get_json(cluster, "configmap", "demo-greeting", "-n", namespace)
    assert configmap["data"] == {"greeting": "hi"}
    deployment = get_json(cluster, "deployment", "demo-web", "-n", namespace)
    assert deployment["status"].get("readyReplicas") == 1
    releases = json.loads(helm("list", "--output=json"))
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]

    helm("uninstall", "demo", "--wait", "--timeout=2m")

    assert json.loads(helm("list", "--output=json")) == []
    missing = cluster.kubectl("get", "configmap", "demo-greeting", "-n", namespace, check=False)
    assert "NotFound" in missing.stderr
