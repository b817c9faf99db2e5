"""Which versions the evaluator evaluates: newer ones, every n-th, at most every s seconds."""

from __future__ import annotations

import pytest

from services.evaluator.schedule import Decision, EvalSchedule


def test_the_first_version_offered_is_due() -> None:
    assert EvalSchedule().decide(0, now=0.0) is Decision.DUE


def test_versions_not_newer_than_the_last_evaluated_are_stale() -> None:
    schedule = EvalSchedule()
    schedule.record(5, now=0.0)

    assert schedule.decide(5, now=10.0) is Decision.STALE
    assert schedule.decide(3, now=10.0) is Decision.STALE
    assert schedule.decide(6, now=10.0) is Decision.DUE


def test_every_n_versions_counts_from_the_last_evaluated_version() -> None:
    schedule = EvalSchedule(every_n_versions=3)
    schedule.record(4, now=0.0)

    decisions = [schedule.decide(v, now=1.0) for v in (5, 6, 7, 9)]

    assert decisions == [Decision.SKIP, Decision.SKIP, Decision.DUE, Decision.DUE]


def test_a_version_that_comes_too_soon_is_kept_for_later() -> None:
    schedule = EvalSchedule(min_interval=30.0)
    schedule.record(1, now=100.0)

    assert schedule.decide(2, now=110.0) is Decision.LATER
    assert schedule.decide(2, now=130.0) is Decision.DUE


def test_a_schedule_resumed_from_a_log_has_no_interval_to_wait() -> None:
    schedule = EvalSchedule(min_interval=30.0, last_version=8)

    assert schedule.decide(9, now=0.0) is Decision.DUE


@pytest.mark.parametrize("fields", [{"every_n_versions": 0}, {"min_interval": -1.0}])
def test_a_nonsense_schedule_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EvalSchedule(**fields)  # type: ignore[arg-type]
