"""The real API server, with the TrainJob CRD installed, refuses bad specs with useful messages.

Each invalid spec is sent to kube-apiserver; the test asserts the words a person needs to
fix it (the field and what is expected), not just a 422. A hypothesis fuzz then sends
random specs: each one is either refused at admission, or accepted and reconciled by the
operator without a handler exception.
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster.operator_harness import (
    Operator,
    api,
    api_error,
    create,
    get_job,
    message_of,
    operator,
    patch_spec,
    trainjob,
    trainjob_crd,
)
from tests.fixtures.cluster import Cluster, wait_until

# Fixtures of the harness, used by name below.
FIXTURES = (api, operator, trainjob_crd)


def edit(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid TrainJob with `path` (dotted, under the object) set to `value` (or removed)."""
    obj = copy.deepcopy(base or trainjob("bad"))
    *parents, leaf = path.split(".")
    node = obj
    for part in parents:
        node = node.setdefault(part, {})
    if value is REMOVE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return obj


REMOVE = object()

INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("no-spec", edit("spec", REMOVE), ["spec: Required value"]),
    ("no-trainer", edit("spec.trainer", REMOVE), ["spec.trainer: Required value"]),
    ("no-image", edit("spec.trainer.image", REMOVE), ["spec.trainer.image: Required value"]),
    ("empty-image", edit("spec.trainer.image", ""), ["spec.trainer.image", "at least 1"]),
    (
        "command-and-function",
        edit("spec.trainer.command", ["python", "train.py"]),
        ["set exactly one of trainer.command", "trainer.function"],
    ),
    (
        "neither-command-nor-function",
        edit("spec.trainer.function", REMOVE),
        ["set exactly one of trainer.command"],
    ),
    (
        "args-with-function",
        edit("spec.trainer.args", ["--lr", "3"]),
        ["trainer.args needs trainer.command"],
    ),
    (
        "function-without-module",
        edit("spec.trainer.function", "train"),
        ["trainer.function must be module:fn", "my_pkg.train:train_func"],
    ),
    ("zero-replicas", edit("spec.replicas", 0), ["spec.replicas", "greater than or equal to 1"]),
    (
        "zero-nproc",
        edit("spec.nprocPerNode", 0),
        ["spec.nprocPerNode", "greater than or equal to 1"],
    ),
    (
        "replicas-as-text",
        edit("spec.replicas", "four"),
        ["spec.replicas", "must be of type integer"],
    ),
    (
        "storage-without-scheme",
        edit("spec.checkpoint.storage", "bucket/prefix"),
        ["checkpoint.storage must be a URL with a scheme", "gs://bucket/prefix"],
    ),
    (
        "score-order",
        edit("spec.checkpoint.scoreOrder", "highest"),
        ["spec.checkpoint.scoreOrder", 'supported values: "max", "min"'],
    ),
    ("keep-none", edit("spec.checkpoint.numToKeep", 0), ["spec.checkpoint.numToKeep", "1"]),
    (
        "resume-from-a-name",
        edit("spec.resumeFrom", "ckpt-000012"),
        ["resumeFrom must be the URL of a committed checkpoint"],
    ),
    (
        "negative-max-failures",
        edit("spec.failurePolicy.maxFailures", -1),
        ["spec.failurePolicy.maxFailures", "greater than or equal to 0"],
    ),
    (
        "max-preemptions-below-unlimited",
        edit("spec.failurePolicy.maxPreemptions", -2),
        ["spec.failurePolicy.maxPreemptions", "greater than or equal to -1"],
    ),
    (
        "backoff-initial-above-max",
        edit("spec.failurePolicy.backoff", {"initialSeconds": 60, "maxSeconds": 10}),
        ["initialSeconds must not exceed", "maxSeconds"],
    ),
    (
        "jitter-above-one",
        edit("spec.failurePolicy.backoff", {"jitter": 1.5}),
        ["spec.failurePolicy.backoff.jitter", "less than or equal to 1"],
    ),
    (
        "circuit-breaker-without-window",
        edit("spec.failurePolicy.circuitBreaker", {"failures": 3}),
        ["spec.failurePolicy.circuitBreaker.windowSeconds: Required value"],
    ),
    (
        "circuit-breaker-longer-than-the-ledger",
        edit("spec.failurePolicy.circuitBreaker", {"failures": 11, "windowSeconds": 60}),
        ["spec.failurePolicy.circuitBreaker.failures", "less than or equal to 10"],
    ),
    (
        "zero-progress-deadline",
        edit("spec.failurePolicy.progressDeadlineSeconds", 0),
        ["spec.failurePolicy.progressDeadlineSeconds", "greater than or equal to 1"],
    ),
    (
        "max-failures-past-int32",
        edit("spec.failurePolicy.maxFailures", 2**31),
        ["spec.failurePolicy.maxFailures", "format int32"],
    ),
    (
        "startup-deadline-past-int32",
        edit("spec.failurePolicy.startupDeadlineSeconds", 2**31),
        ["spec.failurePolicy.startupDeadlineSeconds", "format int32"],
    ),
    (
        "grace-period-past-int64",
        edit("spec.template", {"spec": {"terminationGracePeriodSeconds": 2**63}}),
        ["spec.template.spec.terminationGracePeriodSeconds", "format int64"],
    ),
    (
        "zero-startup-deadline",
        edit("spec.failurePolicy.startupDeadlineSeconds", 0),
        ["spec.failurePolicy.startupDeadlineSeconds", "greater than or equal to 1"],
    ),
    (
        "negative-ttl",
        edit("spec.ttlSecondsAfterFinished", -5),
        ["spec.ttlSecondsAfterFinished", "greater than or equal to 0"],
    ),
    (
        "name-too-long",
        edit("metadata.name", "a" * 43),
        ["metadata.name must be at most 42 characters", "choose a shorter name"],
    ),
    (
        "name-with-a-dot",
        edit("metadata.name", "llama.v2"),
        ["metadata.name must be a DNS-1035 label"],
    ),
    (
        "user-env-sets-the-attempt",
        edit("spec.trainer.env", [{"name": "SPOTRUN_ATTEMPT", "value": "7"}]),
        ["trainer.env may not set the pod contract's variables", "spec.config"],
    ),
    (
        "user-env-sets-the-launcher-deadline",
        edit("spec.trainer.env", [{"name": "SPOTRUN_GRACE_SECONDS", "value": "300"}]),
        ["trainer.env may not set the pod contract's variables"],
    ),
    (
        "user-env-sets-master-addr",
        edit("spec.trainer.env", [{"name": "MASTER_ADDR", "value": "10.0.0.1"}]),
        ["trainer.env may not set the pod contract's variables"],
    ),
    (
        "gpu-count-not-a-quantity",
        edit("spec.trainer.resources", {"limits": {"nvidia.com/gpu": "eight"}}),
        ["spec.trainer.resources.limits.nvidia.com/gpu", 'Invalid value: "eight"'],
    ),
    (
        "restart-policy-never",
        edit("spec.template", {"spec": {"restartPolicy": "Never"}}),
        ["spec.template.spec.restartPolicy", 'supported values: "Always"'],
    ),
    (
        "image-pull-policy",
        edit("spec.trainer.imagePullPolicy", "Sometimes"),
        ["spec.trainer.imagePullPolicy", '"IfNotPresent"'],
    ),
    (
        "negative-grace-period",
        edit("spec.template", {"spec": {"terminationGracePeriodSeconds": -1}}),
        ["terminationGracePeriodSeconds", "greater than or equal to 0"],
    ),
    (
        "elastic-min-replicas-above-replicas",
        edit("spec.elastic", {"minReplicas": 3}),
        ["spec.elastic.minReplicas", "must not exceed spec.replicas", "Lower"],
    ),
    (
        "elastic-with-cold-recovery",
        edit("spec.recovery", "Cold", edit("spec.elastic", {})),
        ["spec.recovery", "spec.elastic needs spec.recovery: Warm", "survivors"],
    ),
    (
        "elastic-with-per-rank-state",
        edit("spec.checkpoint.keepAllRanks", True, edit("spec.elastic", {})),
        ["spec.checkpoint.keepAllRanks", "cannot be used with spec.elastic", "reshards"],
    ),
    (
        "spares-with-cold-recovery",
        edit("spec.recovery", "Cold", edit("spec.spares", 1)),
        ["spec.spares", "spec.spares needs spec.recovery: Warm"],
    ),
    (
        "spares-with-one-replica",
        edit("spec.replicas", 1, edit("spec.spares", 1)),
        ["spec.spares", "spec.replicas of at least 2"],
    ),
    (
        "spares-negative",
        edit("spec.spares", -1),
        ["spec.spares", "greater than or equal to 0"],
    ),
    (
        "elastic-min-replicas-zero",
        edit("spec.elastic", {"minReplicas": 0}),
        ["spec.elastic.minReplicas", "greater than or equal to 1"],
    ),
    (
        "elastic-negative-wait",
        edit("spec.elastic", {"waitSeconds": -1}),
        ["spec.elastic.waitSeconds", "greater than or equal to 0"],
    ),
    (
        "elastic-unknown-batch",
        edit("spec.elastic", {"batch": "local"}),
        ["spec.elastic.batch", 'supported values: "global", "perReplica"'],
    ),
    (
        "user-env-sets-the-target-replicas",
        edit("spec.trainer.env", [{"name": "SPOTRUN_TARGET_REPLICAS", "value": "8"}]),
        ["trainer.env may not set the pod contract's variables"],
    ),
]


@pytest.mark.parametrize(("case", "body", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_refused_with_an_actionable_message(
    api: client.ApiClient, namespace: str, case: str, body: dict[str, Any], expected: list[str]
) -> None:
    err = api_error(lambda: create(api, namespace, body))
    message = message_of(err)
    assert err.status == 422, message
    for words in expected:
        assert words in message, f"{case}: {words!r} not in {message!r}"


def test_at_least_twenty_invalid_specs_are_pinned() -> None:
    assert len(INVALID) >= 20


IMMUTABLE: list[tuple[str, dict[str, Any], str]] = [
    ("replicas", {"replicas": 3}, "spec.replicas and spec.nprocPerNode cannot change"),
    ("replicas", {"replicas": 3}, "create the job with spec.elastic"),
    ("elastic", {"elastic": {"minReplicas": 1}}, "spec.elastic cannot change after creation"),
    ("trainer", {"trainer": {"image": "other:2", "function": "a:b"}}, "spec.trainer cannot change"),
    ("storage", {"checkpoint": {"storage": "gs://elsewhere/x"}}, "spec.checkpoint cannot change"),
    ("config", {"config": {"lr": 1}}, "spec.config cannot change"),
]


def test_immutable_fields_are_refused_on_update_and_mutable_ones_pass(
    api: client.ApiClient, namespace: str
) -> None:
    create(api, namespace, trainjob("frozen"))
    for field, spec, words in IMMUTABLE:
        err = api_error(lambda spec=spec: patch_spec(api, namespace, "frozen", spec))  # type: ignore[misc]
        assert err.status == 422, field
        assert words in message_of(err), message_of(err)
    patch_spec(api, namespace, "frozen", {"suspend": True, "failurePolicy": {"maxFailures": 9}})
    spec = get_job(api, namespace, "frozen")["spec"]
    assert (spec["suspend"], spec["failurePolicy"]["maxFailures"]) == (True, 9)
    # Defaults are applied by the API server, as the operator expects.
    assert spec["failurePolicy"]["maxPreemptions"] == -1
    assert spec["checkpoint"]["async"] is True


def test_a_good_elastic_spec_is_accepted_with_its_defaults(
    api: client.ApiClient, namespace: str
) -> None:
    create(api, namespace, trainjob("elastic", replicas=4, elastic={"minReplicas": 2}))
    spec = get_job(api, namespace, "elastic")["spec"]
    assert spec["elastic"] == {"minReplicas": 2, "waitSeconds": 60, "batch": "global"}
    assert spec["recovery"] == "Warm"
    create(api, namespace, trainjob("elastic-defaults", replicas=1, elastic={}))
    spec = get_job(api, namespace, "elastic-defaults")["spec"]
    assert spec["elastic"] == {"minReplicas": 1, "waitSeconds": 60, "batch": "global"}
    create(api, namespace, trainjob("not-elastic", replicas=4))
    assert "elastic" not in get_job(api, namespace, "not-elastic")["spec"]


def test_spares_may_change_on_a_running_job_and_combine_with_elastic(
    api: client.ApiClient, namespace: str
) -> None:
    create(api, namespace, trainjob("pool", replicas=2))
    for spares in (2, 1, 0):
        patch_spec(api, namespace, "pool", {"spares": spares})
        assert get_job(api, namespace, "pool")["spec"]["spares"] == spares
    create(api, namespace, trainjob("pool-elastic", replicas=3, elastic={}, spares=1))
    spec = get_job(api, namespace, "pool-elastic")["spec"]
    assert (spec["spares"], spec["elastic"]["minReplicas"]) == (1, 1)
    # Still refused: spares on a job that goes Cold.
    err = api_error(lambda: patch_spec(api, namespace, "pool-elastic", {"recovery": "Cold"}))
    assert err.status == 422 and "needs spec.recovery: Warm" in message_of(err)


def test_an_elastic_job_cannot_switch_to_cold_recovery(
    api: client.ApiClient, namespace: str
) -> None:
    create(api, namespace, trainjob("elastic-warm", replicas=4, elastic={"minReplicas": 2}))
    err = api_error(lambda: patch_spec(api, namespace, "elastic-warm", {"recovery": "Cold"}))
    assert err.status == 422
    assert "spec.elastic needs spec.recovery: Warm" in message_of(err), message_of(err)


# -- fuzz: refused at admission, or reconciled without an exception ---------------------------

_names = itertools.count()

wrong_type = st.one_of(
    st.booleans(), st.integers(-3, 3), st.floats(-2, 2, allow_nan=False), st.just("x")
)


def field(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right type (often at or past a bound), sometimes none or junk."""
    return st.integers(0, 9).flatmap(
        lambda n: right if n < 8 else st.none() if n == 8 else wrong_type
    )


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "spec.replicas": field(st.integers(-1, 4)),
    "spec.nprocPerNode": field(st.integers(0, 4)),
    "spec.suspend": field(st.booleans()),
    "spec.ttlSecondsAfterFinished": field(st.integers(-1, 100)),
    "spec.resumeFrom": field(
        st.sampled_from(["gs://spotrun-test/runs/ns/old/ckpt-000003", "ckpt-000003", ""])
    ),
    "spec.config": field(st.dictionaries(st.text(min_size=1, max_size=5), st.integers())),
    "spec.trainer.function": field(st.sampled_from(["pkg.mod:fn", "fn", "a.b:c.d", "1x:y"])),
    "spec.trainer.command": field(st.lists(st.text(max_size=8), max_size=3)),
    "spec.trainer.image": field(st.sampled_from(["", "img:1", "registry.k8s.io/pause:3.10"])),
    "spec.trainer.env": field(
        st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["A", "SPOTRUN_ATTEMPT", "HF_HOME"]), "value": st.text()}
            ),
            max_size=2,
            unique_by=lambda e: e["name"],
        )
    ),
    "spec.checkpoint.storage": field(
        st.sampled_from(["gs://spotrun-test/runs", "file:///shared", "bucket", ""])
    ),
    "spec.checkpoint.numToKeep": field(st.integers(-1, 5)),
    "spec.checkpoint.scoreOrder": field(st.sampled_from(["max", "min", "best"])),
    "spec.checkpoint.scoreAttribute": field(st.text(max_size=10)),
    "spec.failurePolicy.maxFailures": field(st.integers(-2, 5)),
    "spec.failurePolicy.maxPreemptions": field(st.integers(-2, 5)),
    "spec.failurePolicy.progressDeadlineSeconds": field(st.integers(0, 600)),
    "spec.failurePolicy.backoff.initialSeconds": field(st.floats(-1, 400, allow_nan=False)),
    "spec.failurePolicy.backoff.maxSeconds": field(st.floats(-1, 400, allow_nan=False)),
    "spec.failurePolicy.backoff.jitter": field(st.floats(-0.5, 1.5, allow_nan=False)),
    "spec.failurePolicy.circuitBreaker": field(
        st.fixed_dictionaries(
            {"failures": st.integers(0, 12), "windowSeconds": st.floats(-1, 600, allow_nan=False)}
        )
    ),
    "spec.template.spec.terminationGracePeriodSeconds": field(st.integers(-1, 120)),
    "spec.template.spec.serviceAccountName": field(st.sampled_from(["default", "custom-sa"])),
    "spec.recovery": field(st.sampled_from(["Warm", "Cold", "warm"])),
    "spec.elastic": field(
        st.fixed_dictionaries(
            {},
            optional={
                "minReplicas": st.integers(0, 3),
                "waitSeconds": st.integers(-1, 5),
                "batch": st.sampled_from(["global", "perReplica", "local"]),
            },
        )
    ),
}
mutations = st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True).flatmap(
    lambda names: st.tuples(*(st.tuples(st.just(n), FIELDS[n]) for n in names))
)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=mutations)
def test_fuzzed_specs_are_refused_or_reconciled_without_an_exception(
    api: client.ApiClient,
    namespace: str,
    operator: Operator,
    mutations: tuple[tuple[str, Any], ...],
) -> None:
    body = trainjob(f"fuzz-{next(_names)}", replicas=1)
    for path, value in mutations:
        body = edit(path, REMOVE if value is None else value, body)
    try:
        create(api, namespace, body)
    except ApiException as err:
        assert err.status in (400, 422), message_of(err)
        assert message_of(err)
        return
    name = body["metadata"]["name"]
    # Accepted: the operator must take it up (a state) without an exception.
    wait_until(
        f"the operator to reconcile {name}",
        lambda: get_job(api, namespace, name).get("status", {}).get("state"),
        timeout=30,
    )
    time.sleep(0.5)
    errors = {k: v for k, v in operator.metrics().items() if "reconcile_errors_total" in k}
    assert not any(errors.values()), (errors, operator.log())
    assert not operator.tracebacks(), operator.log()


def test_the_printer_columns_show_live_values(
    api: client.ApiClient, cluster: Cluster, namespace: str, operator: Operator
) -> None:
    create(api, namespace, trainjob("printed", replicas=2))
    wait_until(
        "printed Running",
        lambda: get_job(api, namespace, "printed").get("status", {}).get("readyReplicas") == 2,
    )
    out = cluster.kubectl("get", "trainjobs", "-n", namespace, "printed").stdout.splitlines()
    header = out[0].split()
    assert header == [
        "NAME",
        "STATE",
        "READY",
        "SIZE",
        "PREEMPTIONS",
        "FAILURES",
        "CHECKPOINT-STEP",
        "CHECKPOINT-AGE",
        "AGE",
    ]
    row = dict(zip(header, out[1].split(), strict=False))
    assert (row["STATE"], row["READY"], row["SIZE"], row["PREEMPTIONS"], row["FAILURES"]) == (
        "Running",
        "2",
        "2/2",
        "0",
        "0",
    )
