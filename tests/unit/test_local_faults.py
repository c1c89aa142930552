"""Local mode's fault injection: durations as people write them, and when faults are due."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
import yaml

from spotrun.local import supervisor
from spotrun.local.faults import FaultKind, FaultSchedule, format_duration, parse_duration
from spotrun.local.observe import ReplicaFacts, replica_observation
from spotrun.local.supervisor import LocalRunError, Options
from spotrun.local.trainjob import load_trainjob

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trainjob.yaml"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20s", 20.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("2m500ms", 120.5),
        ("45", 45.0),
        ("0.25", 0.25),
        (" 10S ", 10.0),
    ],
)
def test_durations_parse_with_units_or_as_bare_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "20x", "1m 30s", "m1", "-5s", "0s", "0", "inf", "nan"])
def test_bad_durations_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_unit_errors_name_examples_of_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match=r"20s, 1m, 1m30s"):
        parse_duration("20 seconds")


@pytest.mark.parametrize(("seconds", "text"), [(20.0, "20s"), (90.0, "1m30s"), (120.0, "2m")])
def test_durations_format_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_a_fault_is_due_after_its_interval_of_training() -> None:
    schedule = FaultSchedule({"preempt": 20.0})
    schedule.advance(19.9)
    assert schedule.due() is None
    assert schedule.remaining("preempt") == pytest.approx(0.1)
    schedule.advance(0.1)
    assert schedule.due() == "preempt"


def test_firing_restarts_only_that_kinds_clock() -> None:
    schedule = FaultSchedule({"preempt": 2.0, "kill": 3.0})
    # The second kind's clock is staggered by half its interval: its first kill is at 4.5 s.
    assert schedule.remaining("kill") == pytest.approx(4.5)
    schedule.advance(2.0)
    assert schedule.due() == "preempt"
    schedule.fired("preempt")
    schedule.advance(1.5)
    assert schedule.due() is None
    schedule.advance(0.5)
    assert schedule.due() == "preempt"
    schedule.fired("preempt")
    schedule.advance(0.5)
    # The kill clock kept the 4 s trained before the preemptions.
    assert schedule.due() == "kill"
    schedule.fired("kill")
    assert schedule.remaining("kill") == pytest.approx(3.0)
    schedule.advance(1.5)
    assert schedule.due() == "preempt"


def test_kinds_of_one_exact_period_alternate_instead_of_coming_in_pairs() -> None:
    schedule = FaultSchedule({"preempt": 20.0, "kill": 20.0})
    fired: list[tuple[float, str]] = []
    trained = 0.0
    while trained < 100.0:
        schedule.advance(0.5)
        trained += 0.5
        kind = schedule.due()
        if kind is not None:
            schedule.fired(kind)
            fired.append((trained, kind))
    assert fired == [
        (20.0, "preempt"),
        (30.0, "kill"),
        (40.0, "preempt"),
        (50.0, "kill"),
        (60.0, "preempt"),
        (70.0, "kill"),
        (80.0, "preempt"),
        (90.0, "kill"),
        (100.0, "preempt"),
    ]
    # Drawn intervals are not staggered: a Poisson process has no phase.
    drawn = FaultSchedule(
        {"preempt": 20.0, "kill": 20.0}, rng=random.Random(5), random_intervals=True
    )
    draws = random.Random(5)
    first_preempt, first_kill = draws.expovariate(1 / 20.0), draws.expovariate(1 / 20.0)
    assert drawn.remaining("preempt") == pytest.approx(first_preempt)
    assert drawn.remaining("kill") == pytest.approx(first_kill)


def test_the_most_overdue_kind_goes_first() -> None:
    schedule = FaultSchedule({"preempt": 5.0, "kill": 1.0})
    schedule.advance(6.0)
    assert schedule.due() == "kill"


def test_max_injections_stops_every_kind() -> None:
    schedule = FaultSchedule({"preempt": 1.0, "kill": 1.0}, max_injections=2)
    for _ in range(2):
        schedule.advance(1.0)
        kind = schedule.due()
        assert kind is not None
        schedule.fired(kind)
    schedule.advance(10.0)
    assert schedule.due() is None
    assert not schedule.active
    assert schedule.remaining("kill") is None


def test_a_kind_not_asked_for_never_comes() -> None:
    schedule = FaultSchedule({"kill": 1.0})
    schedule.advance(100.0)
    assert schedule.due() == "kill"
    assert schedule.remaining("preempt") is None


def test_victims_are_replayed_by_the_seed() -> None:
    first = FaultSchedule({"kill": 1.0}, rng=random.Random(7))
    second = FaultSchedule({"kill": 1.0}, rng=random.Random(7))
    picks = [first.choose([2, 0, 1]) for _ in range(20)]
    assert picks == [second.choose([0, 1, 2]) for _ in range(20)]
    assert set(picks) == {0, 1, 2}


def test_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        FaultSchedule({"kill": 0.0})


def intervals(schedule: FaultSchedule, kind: FaultKind, count: int) -> list[float]:
    """The next `count` intervals of `kind`, read off the schedule's clock."""
    seen = []
    for _ in range(count):
        remaining = schedule.remaining(kind)
        assert remaining is not None
        seen.append(remaining)
        schedule.advance(remaining)
        assert schedule.due() == kind
        schedule.fired(kind)
    return seen


def test_random_intervals_have_the_asked_mean_and_are_replayed_by_the_seed() -> None:
    first = FaultSchedule({"kill": 10.0}, rng=random.Random(3), random_intervals=True)
    drawn = intervals(first, "kill", 2000)
    assert statistics.mean(drawn) == pytest.approx(10.0, rel=0.1)
    # Exponential: P(below a third of the mean) = 0.28, P(above twice the mean) = 0.14.
    assert 0.2 < sum(d < 10.0 / 3 for d in drawn) / len(drawn) < 0.4
    assert 0.08 < sum(d > 20.0 for d in drawn) / len(drawn) < 0.2
    second = FaultSchedule({"kill": 10.0}, rng=random.Random(3), random_intervals=True)
    assert intervals(second, "kill", 2000) == drawn


def test_fixed_intervals_are_exact_and_draw_nothing_from_the_seed() -> None:
    rng = random.Random(5)
    schedule = FaultSchedule({"preempt": 4.0}, rng=rng)
    assert intervals(schedule, "preempt", 3) == [4.0, 4.0, 4.0]
    # The victims a seed picks do not depend on whether faults are scheduled.
    assert rng.random() == random.Random(5).random()


def test_random_intervals_without_a_fault_interval_is_refused_with_the_flags_to_add() -> None:
    job = load_trainjob(str(EXAMPLE))
    with pytest.raises(
        LocalRunError, match="give --preempt-every, --kill-every or --freeze-every too"
    ):
        supervisor._check(job, Options(random_intervals=True))
    supervisor._check(job, Options(random_intervals=True, kill_every=10.0))
    supervisor._check(job, Options(random_intervals=True, freeze_every=10.0))


def test_freezing_needs_a_warm_group_that_watches_its_peers(tmp_path: Path) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["recovery"] = "Cold"
    cold = tmp_path / "cold.yaml"
    cold.write_text(yaml.safe_dump(manifest))
    with pytest.raises(LocalRunError, match="--freeze-every needs a warm group"):
        supervisor._check(load_trainjob(str(cold)), Options(freeze_every=5.0))
    manifest["spec"]["recovery"] = "Warm"
    manifest["spec"]["trainer"]["env"] = [{"name": "SPOTRUN_PEER_TIMEOUT_SECONDS", "value": "0"}]
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump(manifest))
    with pytest.raises(LocalRunError, match="SPOTRUN_PEER_TIMEOUT_SECONDS not 0"):
        supervisor._check(load_trainjob(str(off)), Options(freeze_every=5.0))
    supervisor._check(load_trainjob(str(EXAMPLE)), Options(freeze_every=5.0))


def test_a_bad_peer_timeout_is_refused_before_anything_starts(tmp_path: Path) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["trainer"]["env"] = [{"name": "SPOTRUN_PEER_TIMEOUT_SECONDS", "value": "soon"}]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(LocalRunError, match=r"trainer.env: SPOTRUN_PEER_TIMEOUT_SECONDS='soon'"):
        supervisor._check(load_trainjob(str(path)), Options())


def test_a_frozen_replica_is_not_flagged_by_the_supervisor() -> None:
    """Only its peers can tell: the policy learns of it from status.peerReports."""
    frozen = replica_observation(ReplicaFacts(index=1, attempt=1, returncode=None, fault="freeze"))
    assert (frozen.phase, frozen.preempted, frozen.preemption_reason) == ("running", False, None)
    killed = replica_observation(ReplicaFacts(index=1, attempt=1, returncode=-9, fault="kill"))
    assert (killed.preempted, killed.preemption_reason) == (True, "InjectedKill")
