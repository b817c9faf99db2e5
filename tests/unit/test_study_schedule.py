"""The study's virtual clock: arrival order, evaluation ticks, samples per round, durations."""

from __future__ import annotations

import pytest

from benchmarks.study.output import tail_mean
from benchmarks.study.schedule import ArrivalQueue, EvalTicks
from benchmarks.study.sites import samples_in_steps
from benchmarks.study.timing import TimeModel


def test_arrivals_pop_in_time_order_and_ties_in_the_order_they_were_started() -> None:
    # Given updates pushed out of time order, two of them at the same instant
    queue: ArrivalQueue[str] = ArrivalQueue()
    queue.push(3.0, site=0, payload="late")
    queue.push(1.0, site=1, payload="first tie")
    queue.push(1.0, site=2, payload="second tie")
    queue.push(2.0, site=3, payload="middle")
    # When they are popped
    order = [queue.pop().payload for _ in range(len(queue))]
    # Then the earliest comes first and a tie keeps its start order
    assert order == ["first tie", "second tie", "middle", "late"]
    assert queue.peek_time() == float("inf")


def test_an_arrival_in_the_past_or_at_infinity_is_refused() -> None:
    queue: ArrivalQueue[None] = ArrivalQueue()
    with pytest.raises(ValueError):
        queue.push(-1.0, site=0, payload=None)
    with pytest.raises(ValueError):
        queue.push(float("inf"), site=0, payload=None)


def test_eval_ticks_are_regular_end_exactly_at_the_budget_and_are_handed_out_once() -> None:
    ticks = EvalTicks(every=0.3, budget=1.0)
    assert ticks.due(0.2) == []
    assert ticks.due(0.65) == pytest.approx([0.3, 0.6])
    assert ticks.due(5.0) == pytest.approx([0.9, 1.0])
    assert ticks.due(10.0) == []


def test_eval_ticks_do_not_drift_after_many_intervals() -> None:
    ticks = EvalTicks(every=0.1, budget=1000.0)
    handed = ticks.due(1000.0)
    assert len(handed) == 10_000
    assert handed[-1] == 1000.0
    assert handed[4_999] == pytest.approx(500.0, abs=1e-9)


def test_a_round_of_fixed_steps_cycles_through_a_small_site_as_train_local_does() -> None:
    # 16 steps of 32 over 39 examples: epochs of 2 batches (32 + 7), 8 epochs
    assert samples_in_steps(39, 32, 16) == 8 * 39
    # A large site never finishes its first epoch
    assert samples_in_steps(1000, 32, 16) == 512
    # 65 % 32 == 1: the single-example batch is dropped, 2 batches of 32 per epoch
    assert samples_in_steps(65, 32, 3) == 96


def test_an_update_takes_compute_times_slowdown_plus_both_transfers() -> None:
    timing = TimeModel(seconds_per_sample=0.01, model_bytes=1_250_000, bandwidth_mbit_s=100.0)
    assert timing.transfer_seconds == pytest.approx(0.2)  # 10 Mbit down + 10 Mbit up
    assert timing.update_seconds(100, slowdown=5.0) == pytest.approx(5.0 + 0.2)


def test_the_tail_mean_weights_each_accuracy_by_how_long_its_version_held() -> None:
    # Given versions published at 0, 70 and 90 s of a 100 s run (tail: 75..100 s)
    points = [
        {"t": 0.0, "accuracy": 0.5},
        {"t": 70.0, "accuracy": 0.8},
        {"t": 90.0, "accuracy": 0.9},
    ]
    # Then 0.8 holds for 15 s of the tail and 0.9 for 10 s
    assert tail_mean(points, "accuracy", end=100.0) == pytest.approx((0.8 * 15 + 0.9 * 10) / 25)
