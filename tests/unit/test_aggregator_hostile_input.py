"""The aggregator survives hostile input found by tests/faults (in-memory bus, no broker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from schemas import (
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    JoinRequest,
    ModelUpdate,
    Rejection,
    TaskSpec,
    Tensor,
    encode,
)
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.core import AggregatorCore
from services.aggregator.layout import ParamLayout
from services.aggregator.service import AggregatorService
from services.aggregator.settings import AggregatorSettings
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.task import TaskDefinition
from services.aggregator.validation import RejectedUpdate
from services.common.bus import Delivery
from services.common.bus.memory import InMemoryBus
from services.common.messaging import decode_delivery
from services.common.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    REASON_HEADER,
    UPDATES_EXCHANGE,
    BindingSpec,
    QueueSpec,
    Topology,
    join_key,
    task_topology,
    update_key,
)

SIZE = 8
LAYOUT = ParamLayout.from_entries([("w", "float32", (SIZE,))])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[InMemoryBus, AggregatorService, threading.Thread]]:
    """A FedAsync aggregator on an in-memory bus, with taps on dead letters and rejections."""
    bus = InMemoryBus()
    task = TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=StrategyConfig(name="fedasync", alpha=0.5),
    )
    taps = (
        QueueSpec("test.dead", durable=False, bindings=(BindingSpec(DEAD_LETTER_EXCHANGE, ""),)),
        QueueSpec(
            "test.rejected",
            durable=False,
            bindings=(BindingSpec(EVENTS_EXCHANGE, "update.rejected.t"),),
        ),
    )
    bus.declare(task_topology("t").merge(Topology(queues=taps)))
    core = AggregatorCore(
        task=task,
        layout=LAYOUT,
        weights=np.zeros(SIZE, np.float32),
        integers={},
        strategy=build_strategy(task.strategy),
    )
    service = AggregatorService(
        bus=bus,
        task=task,
        core=core,
        store=CheckpointStore(tmp_path),
        settings=AggregatorSettings(checkpoint_dir=tmp_path),
    )
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield bus, service, thread
    service.stop()
    thread.join(timeout=10)
    bus.close()


def _take(bus: InMemoryBus, queue: str, timeout: float = 10.0) -> Delivery:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivery = bus.get(queue)
        if delivery is not None:
            bus.ack(delivery)
            return delivery
        time.sleep(0.02)
    raise AssertionError(f"nothing arrived in {queue}")


@pytest.mark.parametrize("message_id", ["\u00b2\u00b3", "\u00e9t\u00e9", "id\u0660"])
def test_a_message_id_of_non_ascii_digits_or_letters_is_dead_lettered_without_a_crash(
    served: tuple[InMemoryBus, AggregatorService, threading.Thread], message_id: str
) -> None:
    # Non-ASCII ids pass `str.isalnum` but not `Rejection.message_id`: building the
    # rejection event raised and killed the engine thread.
    bus, service, thread = served
    # Given an update for an unknown task, carrying an id fedmq's pattern refuses
    update = ModelUpdate(
        task_id="elsewhere",
        trainer_id="site-a",
        base_version=0,
        num_examples=1,
        delta=(Tensor.from_numpy("w", np.ones(SIZE, np.float32)),),
    )
    # When it arrives
    bus.publish(
        UPDATES_EXCHANGE,
        update_key("t", "site-a"),
        encode(update),
        kind="model_update",
        message_id=message_id,
        headers={SCHEMA_HEADER: SCHEMA_VERSION},
    )
    # Then it is dead-lettered with its reason, the rejection event drops the id, and the
    # aggregator still serves
    letter = _take(bus, "test.dead")
    assert letter.properties.headers[REASON_HEADER] == "unknown-task"
    rejection = decode_delivery(_take(bus, "test.rejected"), (Rejection,))
    assert rejection.message_id is None and rejection.update_id == update.update_id
    assert thread.is_alive()
    assert service.core.updates_rejected == 1


_JOIN_FIELDS = {"schema": SCHEMA_VERSION, "kind": "join_request", "task_id": "t"}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xc1 not msgpack", "not-msgpack"),
        (msgpack.packb({**_JOIN_FIELDS, "trainer_id": "site-a"}), "invalid-field"),
        (msgpack.packb({**_JOIN_FIELDS, "kind": "model_update"}), "wrong-kind"),
        (msgpack.packb({**_JOIN_FIELDS, "schema": 99}), "schema-version"),
    ],
)
def test_a_join_that_cannot_be_decoded_gets_a_rejection_reply_with_its_reason(
    served: tuple[InMemoryBus, AggregatorService, threading.Thread], body: bytes, reason: str
) -> None:
    bus, _service, thread = served
    # Given a join request the aggregator cannot decode (no num_examples, garbage, ...)
    # When a caller sends it and waits on its reply-to
    reply = bus.call(
        CONTROL_EXCHANGE,
        join_key("t"),
        body,
        kind="join_request",
        headers={SCHEMA_HEADER: SCHEMA_VERSION},
        timeout=10.0,
    )
    # Then the reply is a Rejection naming the reason, and the request is dead-lettered too
    rejection = decode_delivery(reply, (Rejection,))
    assert (rejection.reason, rejection.task_id) == (reason, None)
    assert rejection.detail
    assert _take(bus, "test.dead").properties.headers[REASON_HEADER] == reason
    assert thread.is_alive()


def test_a_join_for_another_task_gets_a_rejection_naming_the_task_and_trainer(
    served: tuple[InMemoryBus, AggregatorService, threading.Thread],
) -> None:
    bus, _service, _thread = served
    # Given a well-formed join for a task this aggregator does not serve
    request = JoinRequest(task_id="elsewhere", trainer_id="site-a", num_examples=3)
    # When it is sent to this aggregator's control queue
    reply = bus.call(
        CONTROL_EXCHANGE,
        join_key("t"),
        encode(request),
        kind="join_request",
        headers={SCHEMA_HEADER: SCHEMA_VERSION},
        timeout=10.0,
    )
    # Then the Rejection says unknown-task, for that task and trainer
    rejection = decode_delivery(reply, (Rejection,))
    assert (rejection.reason, rejection.task_id, rejection.trainer_id) == (
        "unknown-task",
        "elsewhere",
        "site-a",
    )


def test_a_float64_delta_that_overflows_float32_is_refused_as_non_finite() -> None:
    # 1e300 is finite, so the codec lets it through; cast into the float32 model it was inf,
    # and the next versions NaN (found by tests/faults).
    task = TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=StrategyConfig(name="fedasync", alpha=0.5),
    )
    core = AggregatorCore(
        task=task,
        layout=LAYOUT,
        weights=np.zeros(SIZE, np.float32),
        integers={},
        strategy=build_strategy(task.strategy),
    )
    huge = Tensor.from_numpy("w", np.full(SIZE, 1e300, np.float64))
    update = ModelUpdate(
        task_id="t", trainer_id="site-a", base_version=0, num_examples=1, delta=(huge,)
    )
    with pytest.raises(RejectedUpdate) as caught, np.errstate(over="ignore"):
        core.submit(update, redelivered=False, now=0.0)
    assert caught.value.reason == "non-finite"
    assert core.version == 0 and np.isfinite(core.weights).all()
