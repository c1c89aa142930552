"""The runtime's kube sink on the real API server, with the job's own ServiceAccount token.

The token comes from the TokenRequest API for `<job>-runtime`, as the kubelet would mount
it: what the runtime may do is exactly what the operator's Role grants, nothing more.
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from spotrun.ledger.kube_sink import KubeSinkError
from spotrun.ledger.retention import Retention
from spotrun.ledger.status import FencingError
from tests.cluster.operator_harness import (
    Operator,
    api,
    checkpoint_commit,
    create,
    operator,
    record_checkpoint,
    runtime_sink,
    status,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster, wait_until

FIXTURES = (api, operator, trainjob_crd)


@pytest.fixture
def running_job(api: client.ApiClient, namespace: str, operator: Operator) -> str:
    create(api, namespace, trainjob("bert", replicas=2))
    create(api, namespace, trainjob("other", replicas=1))
    wait_running(api, namespace, "bert", attempt=1, replicas=2)
    wait_running(api, namespace, "other", attempt=1, replicas=1)
    return "bert"


def test_rank0_records_a_checkpoint_with_the_jobs_own_token(
    api: client.ApiClient, cluster: Cluster, namespace: str, running_job: str
) -> None:
    sink = runtime_sink(cluster, api, namespace, running_job, attempt=1)
    uri = record_checkpoint(sink, seq=3, step=300)
    sink.progress({"loss": 0.5}, 320, time.time())

    st = status(api, namespace, running_job)
    assert st["latestCheckpoint"]["uri"] == uri
    assert st["latestCheckpoint"]["step"] == 300
    assert [c["uri"] for c in st["checkpoints"]] == [uri]
    assert st["lastMetrics"]["step"] == 320
    # The operator's own fields are untouched by the runtime's write.
    assert (st["state"], st["attempt"]) == ("Running", 1)


def test_an_older_attempt_is_fenced_out(
    api: client.ApiClient, cluster: Cluster, namespace: str, running_job: str
) -> None:
    with pytest.raises(FencingError):
        record_checkpoint(runtime_sink(cluster, api, namespace, running_job, attempt=0), 1, 10)
    assert "latestCheckpoint" not in status(api, namespace, running_job)


def test_the_crd_orders_checkpoints_by_seq_and_refuses_an_older_one(
    api: client.ApiClient, cluster: Cluster, namespace: str, running_job: str
) -> None:
    sink = runtime_sink(cluster, api, namespace, running_job, attempt=1)
    record_checkpoint(sink, seq=5, step=500)
    # A newer checkpoint whose step is lower (the code's own numbering) is accepted.
    record_checkpoint(sink, seq=6, step=400)
    with pytest.raises(FencingError, match="may not go back"):
        record_checkpoint(sink, seq=4, step=900)
    latest = status(api, namespace, running_job)["latestCheckpoint"]
    assert (latest["seq"], latest["step"]) == (6, 400)


def test_a_fallback_may_move_the_latest_back_only_naming_what_it_replaced(
    api: client.ApiClient, cluster: Cluster, namespace: str, running_job: str
) -> None:
    sink = runtime_sink(cluster, api, namespace, running_job, attempt=1)
    record_checkpoint(sink, seq=3, step=30)
    bad = record_checkpoint(sink, seq=5, step=50)
    good = checkpoint_commit(sink, seq=3, step=30)
    retention = Retention(keep=(3,), delete=(), best=(), latest=3)
    with pytest.raises(FencingError):  # naming the wrong checkpoint is not enough
        sink.resumed(
            good,
            retention,
            [good.entry()],
            replaced=good.uri,
            reason="FellBack",
            message="wrong",
            time=time.time(),
        )
    message = "ckpt-000005 failed verification (sha256); resumed from ckpt-000003 (step 30)"
    sink.resumed(
        good,
        retention,
        [good.entry()],
        replaced=bad,
        reason="FellBack",
        message=message,
        time=time.time(),
    )
    st = status(api, namespace, running_job)
    assert st["latestCheckpoint"]["uri"] == good.uri
    assert st["latestCheckpoint"]["fellBackFrom"] == bad
    assert [c["seq"] for c in st["checkpoints"]] == [3]
    corrupt = [c for c in st["conditions"] if c["type"] == "CheckpointCorrupt"]
    assert corrupt and corrupt[0]["reason"] == "FellBack" and corrupt[0]["message"] == message
    # New checkpoints record above it, and the operator told people why.
    record_checkpoint(sink, seq=6, step=31)
    assert status(api, namespace, running_job)["latestCheckpoint"]["seq"] == 6
    core = client.CoreV1Api(api)

    def fell_back_event() -> bool:
        events = core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={running_job}"
        ).items
        return any(e.reason == "CheckpointFellBack" and e.message == message for e in events)

    wait_until("the operator's CheckpointFellBack event", fell_back_event, timeout=60)


def test_another_jobs_status_is_forbidden(
    api: client.ApiClient, cluster: Cluster, namespace: str, running_job: str
) -> None:
    sink = runtime_sink(cluster, api, namespace, running_job, attempt=1, as_job="other")
    with pytest.raises(KubeSinkError) as refused:
        sink.progress({"loss": 1.0}, 1, time.time())
    assert refused.value.status == 403
    assert "lastMetrics" not in status(api, namespace, "other")


def test_checkpoint_corrupt_is_one_condition_however_often_it_is_reported(
    api: client.ApiClient, cluster: Cluster, namespace: str, running_job: str
) -> None:
    sink = runtime_sink(cluster, api, namespace, running_job, attempt=1)
    sink.checkpoint_corrupt(
        "ckpt-000004 failed its sha256 check; resumed from ckpt-000003", time.time()
    )
    sink.checkpoint_corrupt(
        "ckpt-000007 failed its sha256 check; resumed from ckpt-000006", time.time()
    )
    conditions = status(api, namespace, running_job)["conditions"]
    corrupt = [c for c in conditions if c["type"] == "CheckpointCorrupt"]
    assert len(corrupt) == 1
    assert corrupt[0]["status"] == "True"
    assert "ckpt-000007" in corrupt[0]["message"]
    # The operator's conditions are still there, and survive its next status writes.
    assert {"Running", "PodsReady"} <= {c["type"] for c in conditions}
