"""spotrun's restart policy, shared by the operator and local mode.

Pure code over plain data: no I/O, no clock, no randomness of its own (both are passed
in), and none of torch, fsspec, kopf or kubernetes (an import-linter contract holds it).
The operator and `spotrun run` observe their group, call `plan`, and apply its actions.
"""

from spotrun.lifecycle.actions import (
    Action,
    DeleteJob,
    Fail,
    RestartGroup,
    StartGroup,
    Succeed,
    Suspend,
    Wait,
)
from spotrun.lifecycle.observation import Observation, Phase, ReplicaObservation
from spotrun.lifecycle.plan import Plan, plan
from spotrun.lifecycle.spec import Backoff, CircuitBreaker, FailurePolicy, JobSpec

__all__ = [
    "Action",
    "Backoff",
    "CircuitBreaker",
    "DeleteJob",
    "Fail",
    "FailurePolicy",
    "JobSpec",
    "Observation",
    "Phase",
    "Plan",
    "ReplicaObservation",
    "RestartGroup",
    "StartGroup",
    "Succeed",
    "Suspend",
    "Wait",
    "plan",
]
