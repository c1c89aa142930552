"""The hang watch: start-up allowance until the attempt's first report, then the progress deadline."""

from __future__ import annotations

import pytest

from spotrun.lifecycle.hang import ProgressWatch, progress_watch, startup_seconds
from spotrun.lifecycle.spec import FailurePolicy


@pytest.mark.parametrize(
    ("deadline", "startup", "allowance"),
    [
        pytest.param(None, None, None, id="no deadlines: no limit"),
        pytest.param(10.0, None, 600.0, id="a short deadline: 10 minutes"),
        pytest.param(600.0, None, 1800.0, id="a long deadline: 3 deadlines"),
        pytest.param(10.0, 45.0, 45.0, id="set"),
        pytest.param(None, 45.0, 45.0, id="set without a progress deadline"),
    ],
)
def test_the_start_up_allowance(
    deadline: float | None, startup: float | None, allowance: float | None
) -> None:
    policy = FailurePolicy(progress_deadline_seconds=deadline, startup_deadline_seconds=startup)
    assert startup_seconds(policy) == allowance


def test_no_watch_before_the_attempt_runs() -> None:
    policy = FailurePolicy(progress_deadline_seconds=10.0)
    assert progress_watch(policy, attempt_start=None, last_progress=None) is None


def test_a_report_at_the_attempt_start_counts_as_training() -> None:
    policy = FailurePolicy(progress_deadline_seconds=10.0)
    watch = progress_watch(policy, attempt_start=100.0, last_progress=100.0)
    assert watch == ProgressWatch(100.0, 10.0, False, "failurePolicy.progressDeadlineSeconds=10")
    assert watch.until == 110.0


def test_the_default_allowance_says_where_it_comes_from() -> None:
    policy = FailurePolicy(progress_deadline_seconds=10.0)
    watch = progress_watch(policy, attempt_start=0.0, last_progress=None)
    assert watch is not None and watch.starting
    hung = watch.hang(601.0)
    assert hung is not None
    reason, message = hung
    assert reason == "StartupDeadlineExceeded"
    assert "601s after every replica started" in message
    assert "startupDeadlineSeconds is not set" in message and "600s" in message
