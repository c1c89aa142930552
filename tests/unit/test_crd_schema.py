"""The CRD against what the code expects of it: names, fields, defaults, rules, columns."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spotrun import contract
from spotrun.ledger.status import RUNTIME_FIELDS, in_memory, progress_fields, restored_from
from spotrun.lifecycle import OWNED_FIELDS, JobSpec, Observation, ReplicaObservation, plan
from spotrun.lifecycle import spec as lifecycle_spec
from spotrun.lifecycle.ledger import LEDGER_SIZE
from spotrun.local.trainjob import crd_rules, json_schema, mirrored_rules, openapi_schema

ROOT = Path(__file__).resolve().parents[2]
CRD: dict[str, Any] = yaml.safe_load((ROOT / "crds" / "trainjobs.spotrun.dev.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]["properties"]
STATUS = SCHEMA["properties"]["status"]

# CEL rules only the API server can check: transition rules compare with the stored
# object, and the status rule concerns what the runtime records, never a file.
CLUSTER_ONLY_RULES = {
    ((), "status.latestCheckpoint.uri"),
    (("spec",), "oldSelf"),
    (("status", "latestCheckpoint"), "oldSelf"),
    # Written by the runtime, never admitted from a file; the policy ignores bad keys itself.
    (("status", "peerReports"), "self.all(k"),
}


def test_names_and_scope() -> None:
    names = CRD["spec"]["names"]
    assert CRD["metadata"]["name"] == "trainjobs.spotrun.dev"
    assert CRD["spec"]["group"] == "spotrun.dev"
    assert (names["kind"], names["plural"], names["singular"]) == (
        "TrainJob",
        "trainjobs",
        "trainjob",
    )
    assert names["shortNames"] == ["tj"]
    assert names["categories"] == ["spotrun"]
    assert CRD["spec"]["scope"] == "Namespaced"
    assert (VERSION["name"], VERSION["served"], VERSION["storage"]) == ("v1alpha1", True, True)
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    expected = {
        "State": ".status.state",
        "Ready": ".status.readyReplicas",
        "Size": ".status.size",
        "Preemptions": ".status.preemptions",
        "Failures": ".status.failures",
        "Checkpoint-Step": ".status.latestCheckpoint.step",
        "Checkpoint-Age": ".status.latestCheckpoint.time",
        "Memory-Step": ".status.inMemory.step",
        "Age": ".metadata.creationTimestamp",
    }
    for name, path in expected.items():
        assert columns[name]["jsonPath"] == path
    assert columns["Checkpoint-Age"]["type"] == "date"
    assert columns["Age"]["type"] == "date"
    assert columns["Size"]["type"] == "string"


def test_defaults_match_the_lifecycle_policy() -> None:
    policy = SPEC["failurePolicy"]["properties"]
    backoff = policy["backoff"]["properties"]
    assert policy["maxFailures"]["default"] == lifecycle_spec.DEFAULT_MAX_FAILURES
    assert policy["maxPreemptions"]["default"] == lifecycle_spec.UNLIMITED
    assert backoff["initialSeconds"]["default"] == lifecycle_spec.DEFAULT_INITIAL_BACKOFF
    assert backoff["maxSeconds"]["default"] == lifecycle_spec.DEFAULT_MAX_BACKOFF
    assert backoff["jitter"]["default"] == lifecycle_spec.DEFAULT_JITTER
    assert SPEC["replicas"]["default"] == 1
    assert SPEC["nprocPerNode"]["default"] == 1
    assert SPEC["suspend"]["default"] is False
    checkpoint = SPEC["checkpoint"]["properties"]
    assert (checkpoint["scoreOrder"]["default"], checkpoint["keepAllRanks"]["default"]) == (
        "max",
        False,
    )
    assert checkpoint["async"]["default"] is True


def test_circuit_breaker_fits_in_the_ledger() -> None:
    breaker = SPEC["failurePolicy"]["properties"]["circuitBreaker"]["properties"]
    assert breaker["failures"]["maximum"] == LEDGER_SIZE
    assert STATUS["properties"]["interruptions"]["maxItems"] == LEDGER_SIZE


def test_every_status_field_the_code_writes_is_declared() -> None:
    declared = set(STATUS["properties"])
    assert set(OWNED_FIELDS) <= declared, "undeclared status fields are pruned silently"
    assert set(RUNTIME_FIELDS) <= declared


def test_conditions_are_a_map_keyed_by_type() -> None:
    conditions = STATUS["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) == {
        "type",
        "status",
        "lastTransitionTime",
        "reason",
        "message",
    }


def test_status_written_by_the_policy_fits_the_schema() -> None:
    """Statuses from a whole job's life (start, preemption, failure, restart, success)."""
    validator = jsonschema.Draft7Validator(json_schema()["properties"]["status"])
    spec = JobSpec(replicas=2)
    status: dict[str, Any] = {
        "latestCheckpoint": {"uri": "gs://b/p/default/j/ckpt-000001", "step": 10, "seq": 1},
        "lastMetrics": {"step": 12, "loss": 0.5, "time": "2024-01-01T00:00:00Z"},
    }
    t = 1_700_000_000.25
    run = (
        (),
        (
            ReplicaObservation(0, 1, "running", ready=True),
            ReplicaObservation(1, 1, "running", ready=True),
        ),
        (
            ReplicaObservation(0, 1, "running"),
            ReplicaObservation(1, 1, "running", preempted=True, preemption_reason="NodeShutdown"),
        ),
        (ReplicaObservation(0, 1, "running"), ReplicaObservation(1, 1, "missing", preempted=True)),
        (
            ReplicaObservation(0, 2, "running", ready=True),
            ReplicaObservation(1, 2, "running", ready=True),
        ),
        (ReplicaObservation(0, 2, "failed", exit_code=137, reason="OOMKilled"),),
        (ReplicaObservation(0, 2, "failed", exit_code=137, reason="OOMKilled"),),
        (ReplicaObservation(0, 3, "pending", waiting_reason="Unschedulable", message="no nodes"),),
    )
    for i, replicas in enumerate(run):
        result = plan(spec, status, Observation(t + 100 * i, replicas, generation=3), 0.5)
        status = result.status
        errors = [e.message for e in validator.iter_errors(status)]
        assert not errors, (i, errors, status)
    done = plan(spec, status, Observation(t + 10_000, (), completed=True, generation=3), 0.5).status
    assert not list(validator.iter_errors(done))
    assert done["state"] == "Succeeded"


def test_every_rule_has_an_actionable_message() -> None:
    for (path, rule), message in crd_rules().items():
        assert len(message) > 40, (path, rule)


def test_every_rule_is_mirrored_locally_or_left_to_the_cluster_on_purpose() -> None:
    mirrored = {(r.schema_path, " ".join(r.rule.split())) for r in mirrored_rules()}
    for key in crd_rules():
        path, rule = key
        cluster_only = any(path == where and what in rule for where, what in CLUSTER_ONLY_RULES)
        assert (key in mirrored) != cluster_only, (
            f"CEL rule {rule!r} at {path}: mirror it in spotrun.local.trainjob.MIRRORED_RULES "
            "or list it in CLUSTER_ONLY_RULES"
        )


def test_immutable_fields() -> None:
    """Every spec field is immutable except suspend, failurePolicy, ttlSecondsAfterFinished,
    recovery (how the next preemption is handled: a running group may change its mind) and
    spares (the pool grows or shrinks beside the group)."""
    rules = " ".join(r for p, r in crd_rules() if p == ("spec",))
    mutable = {"suspend", "failurePolicy", "ttlSecondsAfterFinished", "recovery", "spares"}
    for name in SPEC:
        guarded = f"self.{name} == oldSelf.{name}" in rules
        assert guarded != (name in mutable), name


def _strings(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    if schema.get("type") == "string":
        yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _strings(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), Mapping):
        yield from _strings(schema["items"], f"{path}[]")


@pytest.mark.parametrize(
    "path", [p for p, s in _strings(openapi_schema()) if s.get("x-kubernetes-validations")]
)
def test_strings_checked_by_cel_are_bounded(path: str) -> None:
    """The CEL cost estimator rejects rules over strings of unbounded length."""
    schema = dict(_strings(openapi_schema()))[path]
    assert "maxLength" in schema or "enum" in schema


def test_trainer_env_may_not_override_the_pod_contract() -> None:
    (rule,) = [r for p, r in crd_rules() if p == ("spec", "trainer", "env")]
    for name in (
        contract.JOB,
        contract.NAMESPACE,
        contract.ATTEMPT,
        contract.REPLICAS,
        contract.NPROC_PER_NODE,
        contract.NODE_RANK,
        contract.STORAGE,
        contract.RESUME_FROM,
        contract.CONFIG,
        contract.CHECKPOINT,
        contract.FUNCTION,
        contract.STATUS_SINK,
        contract.MASTER_ADDR,
        contract.MASTER_PORT,
        contract.ELASTIC_BATCH,
        contract.TARGET_REPLICAS,
        contract.MEMBER_ADDR,
        contract.SPARES,
        contract.SPARE,
    ):
        assert f"'{name}'" in rule, name


def test_the_runtimes_memory_tier_fields_fit_the_schema() -> None:
    """status.inMemory from a progress report, and restoredFrom of a step only memory held."""
    validator = jsonschema.Draft7Validator(json_schema()["properties"]["status"])
    status = {
        **progress_fields(
            {"loss": 0.5},
            37,
            1_700_000_000.0,
            in_memory(36, bucket=False, attempt=2, time=1_700_000_000.0),
        ),
        "restoredFrom": restored_from(
            "memory", step=36, seq=None, attempt=3, uri=None, time=1_700_000_001.0, reached=38
        ),
    }
    assert not [e.message for e in validator.iter_errors(status)]
    assert status["inMemory"] == {
        "step": 36,
        "bucket": False,
        "attempt": 2,
        "time": "2023-11-14T22:13:20Z",
    }
    assert "seq" not in status["restoredFrom"] and status["restoredFrom"]["reached"] == 38
    # A bucket step keeps its checkpoint number.
    assert restored_from("bucket", step=9, seq=1, attempt=2, uri="u", time=0.0)["seq"] == 1
    assert progress_fields({}, 1, 0.0, None).keys() == {"lastMetrics"}
