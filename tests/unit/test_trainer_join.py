"""Joining a task by RPC: retries with backoff while nobody answers, refusals, deadlines."""

from __future__ import annotations

import random
import threading

import pytest

from schemas import JoinRequest, Rejection
from services.common.bus import InMemoryBus
from services.common.topology import shared_topology, task_topology
from services.trainer.backoff import Backoff
from services.trainer.join import JoinRefused, JoinTimedOut, join_task
from tests.unit.test_trainer_support import TASK, FakeAggregator, global_model, tiny_spec

FAST = Backoff(initial=0.01, maximum=0.02)


def _request(role: str = "trainer") -> JoinRequest:
    return JoinRequest.model_validate(
        {"task_id": TASK, "trainer_id": "site-a", "num_examples": 10, "role": role}
    )


def test_join_keeps_asking_until_an_aggregator_starts_answering() -> None:
    # Given a task whose aggregator only starts after a while
    bus = InMemoryBus()
    spec = tiny_spec()
    bus.declare(task_topology(TASK))
    late = threading.Timer(0.3, lambda: FakeAggregator(bus, spec, global_model(spec, 4)))
    late.start()

    # When a trainer joins with short RPC timeouts
    accepted = join_task(
        bus, _request(), timeout=10.0, stop=threading.Event(), backoff=FAST, rpc_timeout=0.05
    )
    late.join()

    # Then it got the spec and current model once the aggregator was there
    assert accepted is not None
    assert accepted.spec == spec
    assert accepted.model.version == 4


def test_join_before_any_aggregator_declared_its_queue_is_retried_too() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    bus.declare(shared_topology())  # exchanges but no control queue: requests are unroutable
    late = threading.Timer(0.2, lambda: FakeAggregator(bus, spec, global_model(spec, 0)))
    late.start()

    accepted = join_task(
        bus, _request(), timeout=10.0, stop=threading.Event(), backoff=FAST, rpc_timeout=0.05
    )
    late.join()

    assert accepted is not None and accepted.model.version == 0


def test_an_evaluator_joins_with_its_role_and_no_examples() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 2))

    join_task(bus, _request("evaluator"), timeout=5.0, stop=threading.Event(), backoff=FAST)

    [request] = aggregator.joins
    assert request.role == "evaluator"


def test_a_rejection_is_raised_with_the_aggregators_reason() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    refusal = Rejection(reason="unknown-trainer", detail="not on the list")
    FakeAggregator(bus, spec, global_model(spec, 0), refuse=refusal)

    with pytest.raises(JoinRefused, match="unknown-trainer") as raised:
        join_task(bus, _request(), timeout=5.0, stop=threading.Event(), backoff=FAST)

    assert raised.value.rejection == refusal


def test_join_gives_up_after_its_timeout() -> None:
    bus = InMemoryBus()
    bus.declare(task_topology(TASK))  # a control queue nobody consumes

    with pytest.raises(JoinTimedOut, match="no aggregator answered"):
        join_task(
            bus, _request(), timeout=0.2, stop=threading.Event(), backoff=FAST, rpc_timeout=0.05
        )


def test_join_returns_none_when_stopped_while_waiting() -> None:
    bus = InMemoryBus()
    bus.declare(task_topology(TASK))
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()

    accepted = join_task(bus, _request(), timeout=30.0, stop=stop, backoff=FAST, rpc_timeout=0.05)

    assert accepted is None


def test_backoff_grows_to_its_cap_with_bounded_jitter_and_resets() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.25, rng=random.Random(1))

    delays = [backoff.next_delay() for _ in range(6)]
    backoff.reset()

    assert 0.75 <= delays[0] <= 1.25
    assert 1.5 <= delays[1] <= 2.5
    assert all(d <= 8.0 for d in delays)
    assert delays[-1] >= 6.0  # at the cap (minus jitter)
    assert 0.75 <= backoff.next_delay() <= 1.25
