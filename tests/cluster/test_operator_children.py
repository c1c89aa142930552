"""On a real cluster, a TrainJob gets its Service, StatefulSet, pods and runtime RBAC as specified."""

from __future__ import annotations

from kubernetes import client

from tests.cluster.operator_harness import (
    Operator,
    api,
    create,
    env_of,
    get_job,
    operator,
    pods,
    trainjob,
    trainjob_crd,
    wait_running,
)

FIXTURES = (api, operator, trainjob_crd)


def owned_by(obj: object, job: dict[str, object]) -> bool:
    refs = getattr(getattr(obj, "metadata", None), "owner_references", None) or []
    meta = job["metadata"]
    assert isinstance(meta, dict)
    return [(r.kind, r.name, r.uid, r.controller) for r in refs] == [
        ("TrainJob", meta["name"], meta["uid"], True)
    ]


def test_children_are_created_exactly_as_specified(
    api: client.ApiClient, namespace: str, operator: Operator
) -> None:
    create(api, namespace, trainjob("gpt", replicas=3))
    wait_running(api, namespace, "gpt", attempt=1, replicas=3)
    job = get_job(api, namespace, "gpt")
    core, apps, rbac = (
        client.CoreV1Api(api),
        client.AppsV1Api(api),
        client.RbacAuthorizationV1Api(api),
    )

    svc = core.read_namespaced_service("gpt", namespace)
    assert svc.spec.cluster_ip == "None"
    assert svc.spec.publish_not_ready_addresses is True
    assert svc.spec.selector == {"spotrun.dev/job": "gpt"}
    assert owned_by(svc, job)

    sts = apps.read_namespaced_stateful_set("gpt", namespace)
    assert sts.spec.pod_management_policy == "Parallel"
    assert sts.spec.update_strategy.type == "OnDelete"
    assert sts.spec.service_name == "gpt"
    assert sts.spec.replicas == 3
    assert sts.spec.template.spec.restart_policy == "Always"
    assert sts.spec.template.metadata.labels == {
        "spotrun.dev/job": "gpt",
        "spotrun.dev/attempt": "1",
    }
    assert owned_by(sts, job)

    role = rbac.read_namespaced_role("gpt-runtime", namespace)
    assert [(r.api_groups, r.resources, r.resource_names, r.verbs) for r in role.rules] == [
        (["spotrun.dev"], ["trainjobs/status"], ["gpt"], ["patch"]),
        (["spotrun.dev"], ["trainjobs"], ["gpt"], ["get", "list", "watch"]),
    ]
    binding = rbac.read_namespaced_role_binding("gpt-runtime", namespace)
    assert (binding.role_ref.kind, binding.role_ref.name) == ("Role", "gpt-runtime")
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
        ("ServiceAccount", "gpt-runtime", namespace)
    ]
    account = core.read_namespaced_service_account("gpt-runtime", namespace)
    for child in (role, binding, account):
        assert owned_by(child, job)

    live = sorted(pods(api, namespace, "gpt"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in live] == ["gpt-0", "gpt-1", "gpt-2"]
    for index, pod in enumerate(live):
        env = env_of(pod)
        assert env["SPOTRUN_JOB"] == "gpt"
        assert env["SPOTRUN_ATTEMPT"] == "1"
        assert env["SPOTRUN_REPLICAS"] == "3"
        assert env["SPOTRUN_STATUS_SINK"] == "kubernetes"
        assert env["SPOTRUN_HOLD_AFTER_SUCCESS"] == "1"
        assert env["MASTER_ADDR"] == f"gpt-0.gpt.{namespace}.svc"
        assert env["MASTER_PORT"] == "29501"  # 29500 + attempt 1: a fresh rendezvous per attempt
        assert env["SPOTRUN_NODE_RANK"] == {
            "fieldRef": {
                "apiVersion": "v1",
                "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']",
            }
        }
        # The downward API resolves it to the pod's index.
        assert pod["metadata"]["labels"]["apps.kubernetes.io/pod-index"] == str(index)
        assert pod["spec"]["serviceAccountName"] == "gpt-runtime"
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]
        assert pod["spec"]["containers"][0]["command"] == [
            "spotrun",
            "launch",
            "--function",
            "examples.train_linear:train",
        ]

    status = get_job(api, namespace, "gpt")["status"]
    assert (status["readyReplicas"], status["preemptions"], status["failures"]) == (3, 0, 0)
    kinds = {c["type"]: c["status"] for c in status["conditions"]}
    assert kinds == {"Running": "True", "PodsReady": "True"}


def test_deleting_the_trainjob_takes_its_children_along(
    api: client.ApiClient, namespace: str, operator: Operator
) -> None:
    from tests.fixtures.cluster import wait_until

    create(api, namespace, trainjob("gone", replicas=1))
    wait_running(api, namespace, "gone", attempt=1, replicas=1)
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        "spotrun.dev", "v1alpha1", namespace, "trainjobs", "gone"
    )
    apps = client.AppsV1Api(api)
    wait_until(
        "the StatefulSet to be garbage-collected",
        lambda: not apps.list_namespaced_stateful_set(namespace).items,
        timeout=60,
    )
    assert operator.alive()


def test_the_statefulset_carries_the_timing_derived_from_the_spec(
    api: client.ApiClient, namespace: str, operator: Operator
) -> None:
    """The launcher's deadline follows the pod's grace period (20 s: 16 s for the workers),
    and the progress reports the hang deadline (12 s: every 4 s)."""
    body = trainjob("timed", replicas=1)
    body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    body["spec"]["failurePolicy"]["progressDeadlineSeconds"] = 12
    create(api, namespace, body)
    wait_running(api, namespace, "timed", attempt=1, replicas=1)
    sts = client.AppsV1Api(api).read_namespaced_stateful_set("timed", namespace)
    assert sts.spec.template.spec.termination_grace_period_seconds == 20
    trainer = next(c for c in sts.spec.template.spec.containers if c.name == "trainer")
    env = {e.name: e.value for e in trainer.env}
    assert (env["SPOTRUN_GRACE_SECONDS"], env["SPOTRUN_PROGRESS_SECONDS"]) == ("16", "4")
    (live,) = pods(api, namespace, "timed")
    assert env_of(live)["SPOTRUN_GRACE_SECONDS"] == "16"
