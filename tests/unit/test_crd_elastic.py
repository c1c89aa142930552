"""spec.elastic in the CRD: its defaults, bounds and rules, the same for a file and a cluster."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spotrun.lifecycle.spec import Elastic, JobSpec
from spotrun.local.trainjob import (
    TrainJobError,
    apply_defaults,
    json_schema,
    mirrored_rules,
    parse_trainjob,
    rule_message,
)

ROOT = Path(__file__).resolve().parents[2]
CRD: dict[str, Any] = yaml.safe_load((ROOT / "crds" / "trainjobs.spotrun.dev.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]
ELASTIC = SPEC["properties"]["elastic"]
STATUS = SCHEMA["properties"]["status"]

MIN_REPLICAS_RULE = (
    "!has(self.elastic) || !has(self.elastic.minReplicas) "
    "|| self.elastic.minReplicas <= self.replicas"
)
WARM_RULE = "!has(self.elastic) || !has(self.recovery) || self.recovery == 'Warm'"
PER_RANK_RULE = (
    "!has(self.elastic) || !has(self.checkpoint) || !has(self.checkpoint.keepAllRanks) "
    "|| !self.checkpoint.keepAllRanks"
)


def trainjob(spec: str) -> str:
    """A TrainJob file with a valid trainer and `spec` (YAML lines, two-space indented)."""
    return (
        "apiVersion: spotrun.dev/v1alpha1\nkind: TrainJob\nmetadata: {name: job}\nspec:\n"
        "  trainer: {image: x, command: [python]}\n" + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def problems(text: str) -> list[str]:
    with pytest.raises(TrainJobError) as caught:
        parse_trainjob(text, "trainjob.yaml")
    return str(caught.value).splitlines()


# -- defaults --------------------------------------------------------------------------


def test_an_empty_elastic_object_gets_the_policys_defaults() -> None:
    spec = apply_defaults({"spec": {"replicas": 4, "elastic": {}}})["spec"]
    assert spec["elastic"] == {"minReplicas": 1, "waitSeconds": 60, "batch": "global"}
    assert Elastic.from_spec(spec["elastic"]) == Elastic()


def test_a_job_without_elastic_gets_none() -> None:
    assert "elastic" not in apply_defaults({"spec": {"replicas": 4}})["spec"]
    assert parse_trainjob(trainjob("replicas: 4\n")).job_spec().elastic is None


def test_what_is_set_is_kept_and_read_by_the_policy() -> None:
    job = parse_trainjob(
        trainjob("replicas: 4\nelastic: {minReplicas: 2, waitSeconds: 0, batch: perReplica}\n")
    )
    assert job.spec["elastic"] == {"minReplicas": 2, "waitSeconds": 0, "batch": "perReplica"}
    assert job.job_spec() == JobSpec.from_spec(job.spec)
    assert job.job_spec().elastic == Elastic(min_replicas=2, wait_seconds=0, batch="perReplica")


def test_elastic_itself_has_no_default_so_a_job_is_elastic_only_when_asked() -> None:
    assert "default" not in ELASTIC


# -- bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elastic", "message"),
    [
        pytest.param(
            "{minReplicas: 0}",
            "trainjob.yaml:7: spec.elastic.minReplicas: Invalid value: 0: should be greater than "
            "or equal to 1",
            id="no replicas at all",
        ),
        pytest.param(
            "{minReplicas: '2'}",
            'trainjob.yaml:7: spec.elastic.minReplicas: Invalid value: "2": must be of type '
            "integer",
            id="minReplicas as a string",
        ),
        pytest.param(
            "{waitSeconds: -1}",
            "trainjob.yaml:7: spec.elastic.waitSeconds: Invalid value: -1: should be greater than "
            "or equal to 0",
            id="a negative wait",
        ),
        pytest.param(
            "{waitSeconds: 2.5}",
            "trainjob.yaml:7: spec.elastic.waitSeconds: Invalid value: 2.5: must be of type "
            "integer",
            id="a fractional wait",
        ),
        pytest.param(
            "{batch: local}",
            'trainjob.yaml:7: spec.elastic.batch: Unsupported value: "local": supported values: '
            '"global", "perReplica"',
            id="an unknown batch rule",
        ),
        pytest.param(
            "{minReplica: 2}",
            'trainjob.yaml:7: spec.elastic.minReplica: unknown field "minReplica"; did you mean '
            "'minReplicas'?",
            id="a misspelt field",
        ),
    ],
)
def test_out_of_bounds_values_are_refused_as_the_api_server_refuses_them(
    elastic: str, message: str
) -> None:
    text = trainjob(f"replicas: 4\nelastic: {elastic}\n")
    assert message in problems(text)


# -- rules -------------------------------------------------------------------------------


def test_min_replicas_above_replicas_is_refused_with_the_crds_message() -> None:
    text = trainjob("replicas: 2\nelastic:\n  minReplicas: 3\n")
    message = rule_message(("spec",), MIN_REPLICAS_RULE)
    assert problems(text) == [f"trainjob.yaml:8: spec.elastic.minReplicas: {message}"]
    assert "must not exceed spec.replicas" in message


def test_min_replicas_may_equal_replicas() -> None:
    job = parse_trainjob(trainjob("replicas: 3\nelastic: {minReplicas: 3}\n"))
    assert job.job_spec().elastic == Elastic(min_replicas=3)


def test_the_default_min_replicas_fits_the_default_replicas() -> None:
    """An elastic object without minReplicas on a one-replica job: 1 <= 1."""
    job = parse_trainjob(trainjob("elastic: {}\n"))
    assert (job.replicas, job.spec["elastic"]["minReplicas"]) == (1, 1)


def test_elastic_with_cold_recovery_is_refused_with_the_crds_message() -> None:
    text = trainjob("replicas: 4\nrecovery: Cold\nelastic: {minReplicas: 2}\n")
    message = rule_message(("spec",), WARM_RULE)
    assert problems(text) == [f"trainjob.yaml:7: spec.recovery: {message}"]
    assert "a Cold job restarts every replica" in message


def test_elastic_with_per_rank_state_is_refused_with_the_crds_message() -> None:
    text = trainjob(
        "replicas: 4\nelastic: {minReplicas: 2}\n"
        "checkpoint: {storage: 'gs://b/x', keepAllRanks: true}\n"
    )
    message = rule_message(("spec",), PER_RANK_RULE)
    assert problems(text) == [f"trainjob.yaml:8: spec.checkpoint.keepAllRanks: {message}"]
    assert "cannot follow the group to another size" in message


def test_per_rank_state_without_elastic_and_elastic_with_replicated_state_are_fine() -> None:
    per_rank = "checkpoint: {storage: 'gs://b/x', keepAllRanks: true}\n"
    assert parse_trainjob(trainjob("replicas: 4\n" + per_rank)).checkpoint.settings.keep_all_ranks
    replicated = "checkpoint: {storage: 'gs://b/x', keepAllRanks: false}\n"
    job = parse_trainjob(trainjob("replicas: 4\nelastic: {}\n" + replicated))
    assert not job.checkpoint.settings.keep_all_ranks


def test_cold_recovery_without_elastic_is_fine() -> None:
    assert parse_trainjob(trainjob("recovery: Cold\n")).job_spec().recovery == "cold"


def test_elastic_with_the_default_recovery_is_fine() -> None:
    job = parse_trainjob(trainjob("replicas: 4\nelastic: {minReplicas: 2}\n"))
    assert job.spec["recovery"] == "Warm"


def test_the_local_field_is_the_one_the_api_server_names() -> None:
    """A rule's fieldPath decides the field the API server reports; the mirror names it too."""
    by_rule = {" ".join(entry["rule"].split()): entry for entry in SPEC["x-kubernetes-validations"]}
    for rule in mirrored_rules():
        if rule.schema_path != ("spec",):
            continue
        entry = by_rule[" ".join(rule.rule.split())]
        assert rule.field == "spec" + entry.get("fieldPath", ""), rule.rule


def test_elastic_cannot_change_after_creation() -> None:
    rules = {" ".join(e["rule"].split()): e["message"] for e in SPEC["x-kubernetes-validations"]}
    guard = (
        "has(self.elastic) == has(oldSelf.elastic) && "
        "(!has(self.elastic) || self.elastic == oldSelf.elastic)"
    )
    assert "spec.elastic cannot change after creation" in rules[guard]


def test_the_world_size_rule_points_to_elastic() -> None:
    rules = {" ".join(e["rule"].split()): e["message"] for e in SPEC["x-kubernetes-validations"]}
    message = " ".join(
        rules[
            "self.replicas == oldSelf.replicas && self.nprocPerNode == oldSelf.nprocPerNode"
        ].split()
    )
    assert message.startswith("spec.replicas and spec.nprocPerNode cannot change after creation")
    assert "spec.elastic" in message and "below spec.replicas" in message


# -- status --------------------------------------------------------------------------------


def status_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json_schema()["properties"]["status"])


def test_status_size_is_current_over_target() -> None:
    validator = status_validator()
    assert not list(validator.iter_errors({"size": "3/4"}))
    assert list(validator.iter_errors({"size": "3 of 4"}))
    assert list(validator.iter_errors({"size": 3}))
    assert "current/target" in STATUS["properties"]["size"]["description"]


def test_a_resize_is_a_ledger_entry_with_the_sizes() -> None:
    entry = {
        "time": "2024-01-01T00:00:00Z",
        "attempt": 3,
        "kind": "resize",
        "reason": "ReplicaUnschedulable",
        "message": "replica 2 unschedulable for 60s: going on with 3 of 4",
        "fromReplicas": 4,
        "toReplicas": 3,
        "restartTime": "2024-01-01T00:00:00Z",
        "recovery": "warm",
        "step": 120,
        "secondsToRecover": 4.5,
        "stepsLost": 0,
    }
    errors = [e.message for e in status_validator().iter_errors({"interruptions": [entry]})]
    assert not errors
    bad = {**entry, "toReplicas": "three"}
    assert list(status_validator().iter_errors({"interruptions": [bad]}))


def test_an_elastic_groups_members_are_declared() -> None:
    """Undeclared status fields are pruned silently by the API server."""
    group = {"attempt": 4, "mode": "warm", "replicas": 3, "kept": [0, 1], "members": [0, 1, 3]}
    assert not list(status_validator().iter_errors({"group": group}))


def test_kubectl_shows_the_size_instead_of_spec_replicas() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert "Replicas" not in columns
    assert columns["Size"] == {
        "name": "Size",
        "type": "string",
        "jsonPath": ".status.size",
        "description": "Replicas in the current group / spec.replicas",
    }
    names = [c["name"] for c in VERSION["additionalPrinterColumns"]]
    assert names.index("Size") == names.index("Ready") + 1
