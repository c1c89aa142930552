"""`spotrun run --spares`: what a warm spare needs is checked before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spotrun.local.supervisor import LocalRunError, Options, check_spares
from spotrun.local.trainjob import TrainJob, trainjob_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trainjob.yaml"


def job(**spec: Any) -> TrainJob:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"].update(spec)
    return trainjob_from_dict(manifest)


def test_the_example_job_can_keep_a_spare() -> None:
    check_spares(job(), Options(spares=1))


@pytest.mark.parametrize(
    ("spec", "spares", "message"),
    [
        ({"recovery": "Cold"}, 1, "spec.recovery: Warm"),
        ({"replicas": 1}, 1, "replicas >= 2"),
        ({}, -1, "--spares must be >= 0"),
        (
            {"trainer": {"image": "spotrun-runtime:dev", "command": ["bash", "-c", "train"]}},
            1,
            "needs a trainer.function",
        ),
        ({}, 64, "more processes"),
    ],
)
def test_a_spare_that_could_never_join_is_refused_with_the_reason(
    spec: dict[str, Any], spares: int, message: str
) -> None:
    with pytest.raises(LocalRunError, match=message):
        check_spares(job(**spec), Options(spares=spares))


def test_the_spares_flag_on_an_elastic_job_points_to_spec_spares() -> None:
    elastic = job(elastic={"minReplicas": 1})
    with pytest.raises(LocalRunError, match="put spares: 2 in the TrainJob's spec instead"):
        check_spares(elastic, Options(spares=2))
    check_spares(elastic, Options(spares=1), flag="spec.spares")  # what it points to runs


def test_spares_and_an_injected_application_failure_do_not_mix() -> None:
    with pytest.raises(LocalRunError, match="cannot be combined with --fail-rank"):
        check_spares(job(), Options(spares=1, fail_rank=0))
