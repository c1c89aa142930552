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
from spotrun.lifecycle.classify import EXIT_PREEMPTED, Blocker, Interruption, Kind, classify
from spotrun.lifecycle.observation import Observation, Phase, ReplicaObservation
from spotrun.lifecycle.plan import (
    FAILED,
    FINISHED,
    OWNED_FIELDS,
    PENDING,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Plan,
    plan,
    pool_size,
    resume_point,
)
from spotrun.lifecycle.spec import Backoff, CircuitBreaker, FailurePolicy, JobSpec
from spotrun.lifecycle.times import format_time, parse_time

__all__ = [
    "EXIT_PREEMPTED",
    "FAILED",
    "FINISHED",
    "OWNED_FIELDS",
    "PENDING",
    "RESTARTING",
    "RUNNING",
    "SUCCEEDED",
    "SUSPENDED",
    "Action",
    "Backoff",
    "Blocker",
    "CircuitBreaker",
    "DeleteJob",
    "Fail",
    "FailurePolicy",
    "Interruption",
    "JobSpec",
    "Kind",
    "Observation",
    "Phase",
    "Plan",
    "ReplicaObservation",
    "RestartGroup",
    "StartGroup",
    "Succeed",
    "Suspend",
    "Wait",
    "classify",
    "format_time",
    "parse_time",
    "plan",
    "pool_size",
    "resume_point",
]
