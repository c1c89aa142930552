"""Application failures (OOMKilled, a crash loop, a hang) spend maxFailures; preemptions do not.

KWOK runs no containers, so the container's fate is written into the pod's status the way
the kubelet writes it (restartCount up, lastState.terminated with the exit code and reason,
or state.waiting CrashLoopBackOff). KWOK leaves a Running pod's status alone (its stages
only move Pending pods, Job pods and deleted pods), so what the test writes is what the
operator reads.
"""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from tests.cluster.operator_harness import (
    PAUSE_IMAGE,
    Operator,
    api,
    create,
    operator,
    pods,
    runtime_sink,
    status,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster, wait_until

FIXTURES = (api, operator, trainjob_crd)
JOB = "vit"


def crash(
    api: client.ApiClient,
    namespace: str,
    pod: str,
    *,
    exit_code: int,
    reason: str,
    restarts: int = 1,
    waiting: str | None = None,
) -> None:
    """Writes what the kubelet writes after the trainer container exited non-zero."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state: dict[str, Any] = (
        {"waiting": {"reason": waiting, "message": "back-off 20s restarting failed container"}}
        if waiting
        else {"running": {"startedAt": now}}
    )
    client.CoreV1Api(api).patch_namespaced_pod_status(
        pod,
        namespace,
        {
            "status": {
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": PAUSE_IMAGE,
                        "imageID": "",
                        "ready": False,
                        "started": waiting is None,
                        "restartCount": restarts,
                        "state": state,
                        "lastState": {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": reason,
                                "startedAt": now,
                                "finishedAt": now,
                            }
                        },
                    }
                ]
            }
        },
    )


def test_failures_spend_the_budget_until_the_job_fails(
    api: client.ApiClient, namespace: str, operator: Operator
) -> None:
    create(
        api,
        namespace,
        trainjob(
            JOB,
            replicas=2,
            failurePolicy={"maxFailures": 1, "backoff": {"initialSeconds": 0.5, "maxSeconds": 1}},
        ),
    )
    wait_running(api, namespace, JOB, attempt=1, replicas=2)

    crash(api, namespace, f"{JOB}-1", exit_code=137, reason="OOMKilled")

    st = wait_running(api, namespace, JOB, attempt=2, replicas=2)
    assert (st["failures"], st["preemptions"]) == (1, 0)
    assert (st["interruptions"][0]["kind"], st["interruptions"][0]["reason"]) == (
        "failure",
        "OOMKilled",
    )

    crash(
        api,
        namespace,
        f"{JOB}-0",
        exit_code=1,
        reason="Error",
        restarts=3,
        waiting="CrashLoopBackOff",
    )

    def failed() -> dict[str, Any] | None:
        now = status(api, namespace, JOB)
        return now if now.get("state") == "Failed" else None

    st = wait_until("the job to fail", failed, timeout=60)
    assert (st["failures"], st["preemptions"], st["attempt"]) == (2, 0, 2)
    condition = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "MaxFailuresExceeded"
    assert "maxFailures=1" in condition["message"]
    sts = client.AppsV1Api(api).read_namespaced_stateful_set(JOB, namespace)
    assert sts.spec.replicas == 0
    wait_until("the pods to be gone", lambda: not pods(api, namespace, JOB), timeout=60)


def test_a_preemption_after_failures_does_not_spend_the_budget(
    api: client.ApiClient, namespace: str, operator: Operator
) -> None:
    create(
        api,
        namespace,
        trainjob(
            JOB,
            replicas=2,
            failurePolicy={"maxFailures": 1, "backoff": {"initialSeconds": 0.5, "maxSeconds": 1}},
        ),
    )
    wait_running(api, namespace, JOB, attempt=1, replicas=2)
    crash(api, namespace, f"{JOB}-0", exit_code=1, reason="Error")
    wait_running(api, namespace, JOB, attempt=2, replicas=2)

    client.CoreV1Api(api).delete_namespaced_pod(f"{JOB}-1", namespace)

    st = wait_running(api, namespace, JOB, attempt=3, replicas=2)
    assert (st["failures"], st["preemptions"], st["state"]) == (1, 1, "Running")


def test_a_group_without_progress_is_hung_and_restarted_as_a_failure(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    policy = {
        "maxFailures": 3,
        "progressDeadlineSeconds": 3,
        "startupDeadlineSeconds": 3,
        "backoff": {"initialSeconds": 0.5, "maxSeconds": 1},
    }
    create(api, namespace, trainjob(JOB, replicas=1, failurePolicy=policy))
    wait_running(api, namespace, JOB, attempt=1, replicas=1)

    # Attempt 1 never reports: hung once its start-up allowance is over.
    wait_until("attempt 2", lambda: status(api, namespace, JOB).get("attempt") == 2, timeout=60)

    # Attempt 2 reports at once (its own start-up allowance is as short), and then within
    # the deadline: that keeps it alive.
    sink = runtime_sink(cluster, api, namespace, JOB, attempt=2)
    for step in range(8):
        sink.progress({"loss": 1.0 / (step + 1)}, step, time.time())
        time.sleep(1)
        assert status(api, namespace, JOB)["attempt"] == 2
    st = status(api, namespace, JOB)
    assert (st["failures"], st["preemptions"], st["state"]) == (1, 0, "Running")
    assert st["interruptions"][0]["kind"] == "hang"
    assert st["interruptions"][0]["reason"] == "StartupDeadlineExceeded"

    # Then silence, once it trained: hung past the progress deadline.
    st = wait_running(api, namespace, JOB, attempt=3, replicas=1, timeout=60)
    assert st["failures"] == 2
    assert st["interruptions"][1]["kind"] == "hang"
    assert st["interruptions"][1]["reason"] == "ProgressDeadlineExceeded"


def test_a_start_up_longer_than_the_progress_deadline_is_not_a_hang(
    api: client.ApiClient, namespace: str, operator: Operator
) -> None:
    policy = {"progressDeadlineSeconds": 2, "backoff": {"initialSeconds": 0.5, "maxSeconds": 1}}
    create(api, namespace, trainjob(JOB, replicas=1, failurePolicy=policy))
    wait_running(api, namespace, JOB, attempt=1, replicas=1)
    # No report for four progress deadlines: still starting (the allowance is 600 s).
    for _ in range(8):
        time.sleep(1)
        st = status(api, namespace, JOB)
        assert (st["attempt"], st["failures"], st["state"]) == (1, 0, "Running"), st
