"""JobSpec.from_spec reads a TrainJob spec with the CRD's defaults."""

from __future__ import annotations

import pytest

from spotrun import contract
from spotrun.lifecycle.spec import Backoff, CircuitBreaker, FailurePolicy, JobSpec


def test_defaults_match_the_crd() -> None:
    spec = JobSpec.from_spec({"trainer": {"image": "x"}})
    assert spec == JobSpec(
        replicas=1,
        resume_from=None,
        failure_policy=FailurePolicy(
            max_failures=3,
            max_preemptions=-1,
            backoff=Backoff(initial_seconds=10.0, max_seconds=300.0, jitter=0.2),
            circuit_breaker=None,
            progress_deadline_seconds=None,
        ),
        ttl_seconds_after_finished=None,
        grace_seconds=30.0,
    )


def test_every_field_is_read() -> None:
    spec = JobSpec.from_spec(
        {
            "replicas": 4,
            "resumeFrom": "gs://b/p/ckpt-000003",
            "ttlSecondsAfterFinished": 60,
            "template": {"spec": {"terminationGracePeriodSeconds": 90}},
            "failurePolicy": {
                "maxFailures": 0,
                "maxPreemptions": 5,
                "backoff": {"initialSeconds": 1, "maxSeconds": 8, "jitter": 0.5},
                "circuitBreaker": {"failures": 3, "windowSeconds": 600},
                "progressDeadlineSeconds": 1800,
            },
        }
    )
    assert spec == JobSpec(
        replicas=4,
        resume_from="gs://b/p/ckpt-000003",
        failure_policy=FailurePolicy(
            max_failures=0,
            max_preemptions=5,
            backoff=Backoff(1.0, 8.0, 0.5),
            circuit_breaker=CircuitBreaker(3, 600.0),
            progress_deadline_seconds=1800.0,
        ),
        ttl_seconds_after_finished=60.0,
        grace_seconds=90.0,
    )


@pytest.mark.parametrize("grace", [None, 0, 3, 10, 30, 600])
def test_the_policy_waits_for_the_final_checkpoint_as_long_as_the_pod_may_live(
    grace: int | None,
) -> None:
    """The policy's grace is the pod's own: the launcher's deadline (a margin shorter) and
    the policy's wait for the final checkpoint come from the same value."""
    pod = {} if grace is None else {"terminationGracePeriodSeconds": grace}
    spec = {"trainer": {"image": "x"}, "template": {"spec": pod}}
    policy_grace = JobSpec.from_spec(spec).grace_seconds
    assert policy_grace == contract.pod_grace_seconds(spec)
    assert contract.launcher_grace_seconds(policy_grace) <= policy_grace
