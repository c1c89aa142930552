"""The operator SIGKILLed at random points of group restarts converges, restarting once per incident.

Level-based reconcile is what makes this hold: the status carries the attempt and the
open interruption, the StatefulSet and pods carry their attempt, so a fresh operator reads
where the previous one stopped. The kill points are drawn from a seeded random generator
(printed on failure) across the whole restart: before the pod loss was seen, between the
status write and the StatefulSet patch, while old pods are deleted, while new ones start.
"""

from __future__ import annotations

import os
import random
import time

from kubernetes import client

from tests.cluster.operator_harness import (
    Operator,
    api,
    create,
    env_of,
    operator,
    pods,
    record_checkpoint,
    runtime_sink,
    status,
    trainjob,
    trainjob_crd,
    wait_running,
)
from tests.fixtures.cluster import Cluster

FIXTURES = (api, operator, trainjob_crd)
JOB = "moe"
REPLICAS = 3
INCIDENTS = 4
# Another seed explores other kill points: SPOTRUN_CRASH_SEED=7 pytest ...
SEED = int(os.environ.get("SPOTRUN_CRASH_SEED", "20240501"))


def test_operator_killed_during_restarts_converges_with_one_restart_per_incident(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    rng = random.Random(SEED)
    create(api, namespace, trainjob(JOB, replicas=REPLICAS))
    wait_running(api, namespace, JOB, attempt=1, replicas=REPLICAS)
    uri = record_checkpoint(runtime_sink(cluster, api, namespace, JOB, attempt=1), 2, 200)
    core = client.CoreV1Api(api)
    kills: list[str] = []

    for incident in range(1, INCIDENTS + 1):
        wait_running(api, namespace, JOB, attempt=incident, replicas=REPLICAS, timeout=120)
        # Past observe.REPLACED_AFTER_SECONDS: a replacement the killed operator never saw
        # is still recognised by its creation time.
        time.sleep(6)
        victim = f"{JOB}-{rng.randrange(REPLICAS)}"
        core.delete_namespaced_pod(victim, namespace)
        for _ in range(rng.choice((1, 1, 2))):
            delay = rng.uniform(0.0, 3.0)
            time.sleep(delay)
            operator.kill()
            kills.append(f"incident {incident}: {victim} deleted, killed after {delay:.2f}s")
            time.sleep(rng.uniform(0.0, 1.0))
            operator.start()

    final = wait_running(api, namespace, JOB, attempt=INCIDENTS + 1, replicas=REPLICAS, timeout=120)
    context = f"seed {SEED}; {kills}; {final.get('interruptions')}"
    assert (final["preemptions"], final["failures"]) == (INCIDENTS, 0), context
    live = pods(api, namespace, JOB)
    assert len(live) == REPLICAS, context
    for pod in live:
        assert pod["metadata"]["labels"]["spotrun.dev/attempt"] == str(INCIDENTS + 1), context
        assert env_of(pod)["SPOTRUN_RESUME_FROM"] == uri
    # And it stays converged: no late, duplicate restart of an incident already handled.
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        st = status(api, namespace, JOB)
        assert (st["attempt"], st["preemptions"]) == (INCIDENTS + 1, INCIDENTS), context
        time.sleep(0.5)
    assert operator.starts == 1 + len(kills)
