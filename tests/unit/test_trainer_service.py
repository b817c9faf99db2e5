"""The trainer against a fake aggregator on an in-memory bus: join, train, send, follow, leave."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import Heartbeat, ModelUpdate, Rejection, TrainerLeft, decode
from services.common.bus import ConnectionLost, InMemoryBus
from services.common.models import build_model, state_entries
from services.common.signing import generate_keypair, verify_update, write_signing_key
from services.common.topology import UPDATES_EXCHANGE, follower_topology, updates_queue
from services.trainer.backoff import Backoff
from services.trainer.local_model import LocalModel
from services.trainer.local_round import build_update, round_seed, run_local_round
from services.trainer.service import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, TrainerService
from services.trainer.settings import TrainerSettings
from tests.unit.test_trainer_support import (
    TASK,
    Background,
    FakeAggregator,
    global_model,
    tiny_dataset,
    tiny_spec,
    wait_until,
)

TRAINER = "site-a"
FAST = Backoff(initial=0.01, maximum=0.05)


def _settings(**overrides: Any) -> TrainerSettings:
    fields: dict[str, Any] = {"trainer_id": TRAINER, "task_id": TASK, "join_timeout": 10.0}
    fields.update(overrides)
    return TrainerSettings(**fields)


def _trainer(bus: InMemoryBus, **overrides: Any) -> TrainerService:
    return TrainerService(_settings(**overrides), bus=bus, dataset=tiny_dataset(), backoff=FAST)


def test_trainer_publishes_one_update_with_exactly_the_float_entries_of_its_base_version() -> None:
    # Given an aggregator whose current model is version 7
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 7))

    # When a trainer runs for one update
    code = _trainer(bus, max_updates=1).run()

    # Then it sent one update of version 7, float entries only, in state_dict order
    assert code == EXIT_OK
    [(delivery, update)] = aggregator.take_updates()
    model = build_model("cnn-small", num_classes=2, in_channels=1, image_size=8, seed=0)
    floats = [name for name, dtype, _ in state_entries(model) if dtype == "float32"]
    assert [t.name for t in update.delta] == floats
    assert not any(t.name.endswith("num_batches_tracked") for t in update.delta)
    assert update.base_version == 7
    assert update.num_examples == len(tiny_dataset())
    assert update.trainer_id == TRAINER
    assert {t.dtype for t in update.delta} == {"float32"}
    assert any(np.abs(t.to_numpy()).max() > 0 for t in update.delta)
    assert update.metrics["train_loss"] > 0
    # and the envelope says who sent what
    assert delivery.routing_key == f"update.{TASK}.{TRAINER}"
    assert delivery.properties.kind == "model_update"
    assert delivery.properties.user_id == "guest"
    assert delivery.properties.headers == {"fedmq-schema": 1}
    assert [j.trainer_id for j in aggregator.joins] == [TRAINER]
    assert aggregator.joins[0].num_examples == len(tiny_dataset())


def test_update_travels_in_bfloat16_when_the_task_asks_for_it() -> None:
    bus = InMemoryBus()
    spec = tiny_spec(precision="bfloat16")
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))

    assert _trainer(bus, max_updates=1).run() == EXIT_OK

    [(_, update)] = aggregator.take_updates()
    assert {t.dtype for t in update.delta} == {"bfloat16"}
    assert all(t.nbytes == 2 * int(np.prod(t.shape)) for t in update.delta)


def test_the_same_seed_gives_the_same_update_bytes() -> None:
    deltas = []
    for _ in range(2):
        bus = InMemoryBus()
        spec = tiny_spec()
        aggregator = FakeAggregator(bus, spec, global_model(spec, 1))
        assert _trainer(bus, max_updates=1, seed=5).run() == EXIT_OK
        [(_, update)] = aggregator.take_updates()
        deltas.append([t.data for t in update.delta])

    assert deltas[0] == deltas[1]


def test_a_different_seed_gives_a_different_update() -> None:
    deltas = []
    for seed in (1, 2):
        bus = InMemoryBus()
        spec = tiny_spec()
        aggregator = FakeAggregator(bus, spec, global_model(spec, 1))
        assert _trainer(bus, max_updates=1, seed=seed).run() == EXIT_OK
        [(_, update)] = aggregator.take_updates()
        deltas.append([t.data for t in update.delta])

    assert deltas[0] != deltas[1]


class _RefusingBus(InMemoryBus):
    """Fills the updates queue so the broker refuses updates, then frees it after `refusals`."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.attempts: list[str] = []

    def publish(self, exchange: str, routing_key: str, body: bytes, **kw: Any) -> str:
        if exchange != UPDATES_EXCHANGE or routing_key.endswith(".filler"):
            return super().publish(exchange, routing_key, body, **kw)
        self.attempts.append(decode(body, accept=(ModelUpdate,)).update_id)
        if len(self.attempts) > self.refusals:
            self.purge(updates_queue(TASK))  # the aggregator caught up
        return super().publish(exchange, routing_key, body, **kw)


def test_an_update_refused_by_back_pressure_is_retried_with_the_same_update_id() -> None:
    # Given an updates queue already full (reject-publish): the next update is refused
    bus = _RefusingBus(refusals=2)
    spec = tiny_spec()
    # (an update of this model is about 1.7 MB: it fits alone, not beside the filler)
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0), max_update_bytes=4_000_000)
    bus.publish(UPDATES_EXCHANGE, f"update.{TASK}.filler", b"x" * 3_000_000, kind="filler")

    # When the trainer sends one update
    code = _trainer(bus, max_updates=1).run()

    # Then it tried three times with one update_id and the third attempt got through
    assert code == EXIT_OK
    assert len(bus.attempts) == 3
    assert len(set(bus.attempts)) == 1
    [(_, update)] = aggregator.take_updates()
    assert update.update_id == bus.attempts[0]


def test_stopping_ends_the_loop_and_announces_leaving() -> None:
    # Given a trainer running with no update limit
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))
    trainer = _trainer(bus)
    running = Background(trainer.run)
    # Heartbeats tick on their own clock: wait until one has caught a round in progress.
    wait_until(
        lambda: (
            trainer.updates_sent >= 2
            and "training" in {b.state for b in aggregator.events(Heartbeat)}
        )
    )

    # When it is asked to stop
    trainer.stop()

    # Then it exits 0 and says it left, with the number of updates it sent
    assert running.join() == EXIT_OK
    [left] = aggregator.events(TrainerLeft)
    assert left.trainer_id == TRAINER
    assert left.reason == "shutdown"
    assert left.updates_sent == trainer.updates_sent
    beats = aggregator.events(Heartbeat)
    assert beats and all(b.sender_id == TRAINER and b.role == "trainer" for b in beats)
    assert {"training"} <= {b.state for b in beats}


def test_stopping_mid_round_abandons_the_round_without_sending_it() -> None:
    # Given a simulated straggler whose round takes seconds
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))
    trainer = TrainerService(
        _settings(simulated_slowdown=1000.0), bus=bus, dataset=tiny_dataset(64), backoff=FAST
    )
    running = Background(trainer.run)
    wait_until(lambda: "training" in {b.state for b in aggregator.events(Heartbeat)})

    # When it is stopped while training
    trainer.stop()

    # Then it leaves promptly and nothing half-trained was sent
    assert running.join(timeout=10.0) == EXIT_OK
    assert aggregator.take_updates() == []
    [left] = aggregator.events(TrainerLeft)
    assert left.updates_sent == 0


def test_asynchronous_trainer_continues_from_the_newest_model_of_its_follower_queue() -> None:
    # Given versions 8 and 9 published after the trainer's queue exists (it keeps only 9)
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 7))
    bus.declare(follower_topology(TASK, TRAINER))
    aggregator.publish_model(global_model(spec, 8, seed=8), current=False)
    aggregator.publish_model(global_model(spec, 9, seed=9), current=False)

    # When the trainer sends two updates
    assert _trainer(bus, max_updates=2).run() == EXIT_OK

    # Then the first is based on the joined version and the second on the newest one
    updates = [u for _, u in aggregator.take_updates()]
    assert [u.base_version for u in updates] == [7, 9]
    assert updates[0].update_id != updates[1].update_id


def test_asynchronous_trainer_without_a_newer_model_trains_again_from_the_same_base() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 4))

    assert _trainer(bus, max_updates=2).run() == EXIT_OK

    first, second = (u for _, u in aggregator.take_updates())
    assert (first.base_version, second.base_version) == (4, 4)
    # The second round starts again from version 4 (not from the weights the first round
    # trained, which it already sent): its delta is exactly a fresh round from version 4.
    local = LocalModel(spec)
    local.load_global(global_model(spec, 4))
    result = run_local_round(local, tiny_dataset(), seed=round_seed(0, 1), stop=threading.Event())
    expected = build_update(local, result, trainer_id=TRAINER)
    assert [t.data for t in second.delta] == [t.data for t in expected.delta]
    assert [t.data for t in first.delta] != [t.data for t in second.delta]


def test_synchronous_trainer_waits_for_a_newer_model_before_training_again() -> None:
    # Given a round-barrier task
    bus = InMemoryBus()
    spec = tiny_spec(synchronous=True)
    aggregator = FakeAggregator(bus, spec, global_model(spec, 3))
    trainer = _trainer(bus, max_updates=2)
    running = Background(trainer.run)
    wait_until(lambda: trainer.updates_sent == 1)

    # When no newer model comes for a while, then version 4 does
    wait_until(lambda: "waiting" in {b.state for b in aggregator.events(Heartbeat)})
    first = [u for _, u in aggregator.take_updates()]
    aggregator.publish_model(global_model(spec, 4, seed=4))

    # Then the second update was only made after version 4, from version 4
    assert running.join() == EXIT_OK
    second = [u for _, u in aggregator.take_updates()]
    assert [u.base_version for u in first] == [3]
    assert [u.base_version for u in second] == [4]


def test_a_refused_join_exits_with_its_own_code_and_sends_nothing() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    refusal = Rejection(reason="unknown-trainer", detail="site-a is not on the list")
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0), refuse=refusal)

    code = _trainer(bus, max_updates=1).run()

    assert code == EXIT_REFUSED
    assert aggregator.take_updates() == []
    assert aggregator.events(TrainerLeft) == []


def test_no_aggregator_within_the_join_timeout_is_a_failure() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    FakeAggregator(bus, spec, global_model(spec, 0)).stop_answering()

    code = TrainerService(
        _settings(join_timeout=0.3), bus=bus, dataset=tiny_dataset(), backoff=FAST
    ).run()

    assert code == EXIT_FAILED


class _FlakyBus(InMemoryBus):
    """Loses the connection once, on the first update, and counts connections like PikaBus."""

    def __init__(self) -> None:
        super().__init__()
        self.connects = 1
        self.update_ids: list[str] = []

    def publish(self, exchange: str, routing_key: str, body: bytes, **kw: Any) -> str:
        if exchange == UPDATES_EXCHANGE:
            self.update_ids.append(decode(body, accept=(ModelUpdate,)).update_id)
            if len(self.update_ids) == 1:
                self.connects += 1  # the bus reconnected, but this publish was not confirmed
                raise ConnectionLost("connection reset by peer")
        return super().publish(exchange, routing_key, body, **kw)


def test_after_a_lost_connection_the_trainer_joins_again_and_resends_the_same_update() -> None:
    # Given a bus that drops the first update on the floor with a lost connection
    bus = _FlakyBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 2))

    # When the trainer sends two updates
    assert _trainer(bus, max_updates=2).run() == EXIT_OK

    # Then it joined again, resent the lost update unchanged, and went on
    assert [j.trainer_id for j in aggregator.joins] == [TRAINER, TRAINER]
    assert bus.update_ids[0] == bus.update_ids[1]
    updates = [u for _, u in aggregator.take_updates()]
    assert [u.update_id for u in updates] == bus.update_ids[1:]
    assert [u.base_version for u in updates] == [2, 2]


class _ReconnectingBus(InMemoryBus):
    """Reports one silent reconnect (PikaBus' `connects` grows) after the first update."""

    def __init__(self) -> None:
        super().__init__()
        self.connects = 1

    def publish(self, exchange: str, routing_key: str, body: bytes, **kw: Any) -> str:
        message_id = super().publish(exchange, routing_key, body, **kw)
        if exchange == UPDATES_EXCHANGE:
            self.connects = 2
        return message_id


def test_a_silent_reconnect_makes_the_trainer_join_again_keeping_its_place() -> None:
    bus = _ReconnectingBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 5))

    assert _trainer(bus, max_updates=2).run() == EXIT_OK

    assert len(aggregator.joins) == 2
    assert [u.base_version for _, u in aggregator.take_updates()] == [5, 5]


def test_a_model_offered_on_rejoin_is_used_when_newer_than_the_base() -> None:
    # Given the aggregator moved to version 6 while the connection was away
    bus = _ReconnectingBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 5))
    original = bus.publish

    def publish_then_advance(exchange: str, routing_key: str, body: bytes, **kw: Any) -> str:
        message_id = original(exchange, routing_key, body, **kw)
        if exchange == UPDATES_EXCHANGE:
            aggregator.model = global_model(spec, 6, seed=6)
        return message_id

    bus.publish = publish_then_advance  # type: ignore[method-assign]

    assert _trainer(bus, max_updates=2).run() == EXIT_OK

    assert [u.base_version for _, u in aggregator.take_updates()] == [5, 6]


def test_local_steps_limit_the_batches_of_a_round() -> None:
    bus = InMemoryBus()
    spec = tiny_spec(local_steps=2, local_epochs=3)
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))

    assert _trainer(bus, max_updates=1).run() == EXIT_OK

    [(_, update)] = aggregator.take_updates()
    assert update.metrics["train_steps"] == 2


def test_a_delta_above_the_task_norm_bound_is_clipped_to_fit() -> None:
    bus = InMemoryBus()
    spec = tiny_spec(max_update_norm=0.01, learning_rate=0.5)
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))

    assert _trainer(bus, max_updates=1).run() == EXIT_OK

    [(_, update)] = aggregator.take_updates()
    assert 0.009 < _norm(update) <= 0.01


def test_the_trainer_runs_training_off_the_main_thread() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    FakeAggregator(bus, spec, global_model(spec, 0))
    seen: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return run_local_round(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("services.trainer.service.run_local_round", spy)
        assert _trainer(bus, max_updates=1).run() == EXIT_OK

    assert seen and all(name.startswith("fedmq-train") for name in seen)


def _norm(update: ModelUpdate) -> float:
    return float(np.sqrt(sum(np.sum(t.to_numpy().astype(np.float64) ** 2) for t in update.delta)))


def test_a_site_without_examples_fails_before_joining() -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))
    empty = tiny_dataset().subset(np.asarray([], dtype=np.int64))

    code = TrainerService(_settings(), bus=bus, dataset=empty, backoff=FAST).run()

    assert code == EXIT_FAILED
    assert aggregator.joins == []


def test_a_crash_during_training_is_announced_as_an_error_before_it_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus = InMemoryBus()
    spec = tiny_spec()
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("CUDA fell off the bus")

    monkeypatch.setattr("services.trainer.service.run_local_round", broken)

    with pytest.raises(RuntimeError, match="CUDA"):
        _trainer(bus).run()

    [left] = aggregator.events(TrainerLeft)
    assert left.reason == "error"
    assert "CUDA fell off the bus" in left.detail


def test_updates_are_signed_with_the_trainers_key_when_one_is_given(tmp_path: Path) -> None:
    bus = InMemoryBus()
    spec = tiny_spec(signatures_required=True)
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))
    private, public = generate_keypair()
    write_signing_key(tmp_path / "site-a.key", private)

    code = _trainer(bus, max_updates=1, signing_key_file=tmp_path / "site-a.key").run()

    assert code == EXIT_OK
    [(_, update)] = aggregator.take_updates()
    assert update.signature is not None
    assert verify_update(update, public)
    assert not verify_update(update, generate_keypair()[1])


def test_a_task_requiring_signatures_fails_a_trainer_without_a_key() -> None:
    bus = InMemoryBus()
    spec = tiny_spec(signatures_required=True)
    aggregator = FakeAggregator(bus, spec, global_model(spec, 0))

    code = _trainer(bus, max_updates=1).run()

    assert code == EXIT_FAILED
    assert aggregator.take_updates() == []
    [left] = aggregator.events(TrainerLeft)
    assert left.reason == "error" and "signed" in left.detail
