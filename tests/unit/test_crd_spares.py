"""spec.spares in the CRD and the policy's spec: bounds and rules, the same for a file and a cluster."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotrun.lifecycle.spec import JobSpec
from spotrun.local.supervisor import LocalRunError, Options, _check
from spotrun.local.trainjob import TrainJobError, parse_trainjob, rule_message

ROOT = Path(__file__).resolve().parents[2]
CRD: dict[str, Any] = yaml.safe_load((ROOT / "crds" / "trainjobs.spotrun.dev.yaml").read_text())
SPEC = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

WARM_RULE = (
    "!has(self.spares) || self.spares == 0 || !has(self.recovery) || self.recovery == 'Warm'"
)
REPLICAS_RULE = "!has(self.spares) || self.spares == 0 || self.replicas >= 2"


def trainjob(spec: str) -> str:
    return (
        "apiVersion: spotrun.dev/v1alpha1\nkind: TrainJob\nmetadata: {name: job}\nspec:\n"
        "  trainer: {image: x, function: 'examples.train_linear:train_func'}\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def problems(text: str) -> list[str]:
    with pytest.raises(TrainJobError) as caught:
        parse_trainjob(text, "trainjob.yaml")
    return str(caught.value).splitlines()


def test_spares_is_a_bounded_count_without_a_default() -> None:
    field = SPEC["properties"]["spares"]
    assert (field["type"], field["minimum"], field["maximum"]) == ("integer", 0, 100)
    assert "default" not in field
    assert JobSpec.from_spec({"replicas": 3}).spares == 0
    spec = JobSpec.from_spec({"replicas": 3, "spares": 2})
    assert (spec.spares, spec.pool) == (2, 5)


@pytest.mark.parametrize(
    ("spec", "rule", "words"),
    [
        ("replicas: 2\nspares: 1\nrecovery: Cold\n", WARM_RULE, "needs spec.recovery: Warm"),
        ("replicas: 1\nspares: 1\n", REPLICAS_RULE, "at least 2"),
    ],
    ids=["cold", "one-replica"],
)
def test_spares_that_cannot_work_are_refused_with_the_crds_message(
    spec: str, rule: str, words: str
) -> None:
    message = rule_message(("spec",), rule)
    assert words in message
    (problem,) = [p for p in problems(trainjob(spec)) if "spec.spares:" in p]
    assert problem.endswith(f"spec.spares: {message}")


def test_spares_of_zero_ask_for_nothing_and_a_good_job_is_accepted() -> None:
    assert parse_trainjob(trainjob("replicas: 1\nspares: 0\nrecovery: Cold\n")).replicas == 1
    job = parse_trainjob(trainjob("replicas: 2\nspares: 1\n"))
    assert job.job_spec().pool == 3


def test_spares_may_change_after_creation_and_combine_with_elastic() -> None:
    rules = " ".join(" ".join(e["rule"].split()) for e in SPEC["x-kubernetes-validations"])
    assert "oldSelf.spares" not in rules  # no transition rule: the operator resizes the pool
    job = parse_trainjob(trainjob("replicas: 3\nspares: 1\nelastic: {minReplicas: 2}\n"))
    spec = job.job_spec()
    assert (spec.pool, spec.elastic is not None) == (4, True)


def test_local_mode_refuses_spec_spares_with_the_spares_flag() -> None:
    job = parse_trainjob(trainjob("replicas: 2\nspares: 1\n"))
    with pytest.raises(LocalRunError, match="both ask for warm spares"):
        _check(job, Options(spares=1))
    _check(job, Options())


def test_local_mode_names_spec_spares_when_the_trainer_cannot_wait() -> None:
    text = trainjob("replicas: 2\nspares: 1\n").replace(
        "function: 'examples.train_linear:train_func'", "command: [sh, -c, 'true']"
    )
    with pytest.raises(LocalRunError, match=r"^spec.spares needs a trainer.function"):
        _check(parse_trainjob(text), Options())
