"""Wire-level guards against a hostile site: reply addresses, forged headers, foreign models."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from schemas import (
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    GlobalModel,
    JoinRequest,
    TaskSpec,
    Tensor,
    encode,
)
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.core import AggregatorCore
from services.aggregator.layout import ParamLayout
from services.aggregator.service import BAD_REPLY_TO_REASON, AggregatorService
from services.aggregator.settings import AggregatorSettings
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.task import TaskDefinition
from services.common.bus import Delivery, MessageProperties, TransportError
from services.common.bus.base import dead_letter_properties, is_direct_reply_to
from services.common.bus.memory import InMemoryBus
from services.common.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    MODELS_EXCHANGE,
    ORIGINAL_USER_ID_HEADER,
    REASON_HEADER,
    BindingSpec,
    QueueSpec,
    Topology,
    follower_topology,
    join_key,
    model_key,
    task_topology,
)
from services.trainer.follower import ModelFollower

SIZE = 8
LAYOUT = ParamLayout.from_entries([("w", "float32", (SIZE,))])
VICTIM = "fedmq.t.follow.victim"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[InMemoryBus, AggregatorService]]:
    """A FedAsync aggregator on an in-memory bus, a victim's follower queue, a dead-letter tap."""
    bus = InMemoryBus()
    task = TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=StrategyConfig(name="fedasync", alpha=0.5),
    )
    tap = QueueSpec("test.dead", durable=False, bindings=(BindingSpec(DEAD_LETTER_EXCHANGE, ""),))
    bus.declare(
        task_topology("t").merge(follower_topology("t", "victim")).merge(Topology(queues=(tap,)))
    )
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
    yield bus, service
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


def _drain(bus: InMemoryBus, queue: str) -> list[Delivery]:
    taken = []
    while (delivery := bus.get(queue)) is not None:
        bus.ack(delivery)
        taken.append(delivery)
    return taken


@pytest.mark.parametrize(
    "address",
    ["amq.rabbitmq.reply-to.g1h2AA9yZXBseUAx.QVoGNiM7XkRMbk8HqTkhKg==", "amq.rabbitmq.reply-to.x"],
)
def test_addresses_issued_by_direct_reply_to_are_recognised(address: str) -> None:
    assert is_direct_reply_to(address)


@pytest.mark.parametrize(
    "address", [None, "", "amq.rabbitmq.reply-to", VICTIM, "fedmq.dead", "amq.rabbitmq.reply-tox"]
)
def test_named_queues_and_the_bare_pseudo_queue_are_not_reply_addresses(
    address: str | None,
) -> None:
    assert not is_direct_reply_to(address)


@pytest.mark.parametrize("reply_to", [VICTIM, "fedmq.dead"])
def test_given_a_join_naming_another_queue_as_reply_to_when_served_then_nothing_lands_there(
    served: tuple[InMemoryBus, AggregatorService], reply_to: str
) -> None:
    bus, service = served
    # Given a well-formed join whose reply_to names someone else's queue
    _drain(bus, VICTIM)
    join = JoinRequest(task_id="t", trainer_id="mallory", num_examples=5)
    # When it reaches the aggregator
    bus.publish(
        CONTROL_EXCHANGE,
        join_key("t"),
        encode(join),
        kind=join.kind,
        headers={SCHEMA_HEADER: SCHEMA_VERSION},
        reply_to=reply_to,
        user_id="guest",
    )
    # Then it is dead-lettered with the reason and the broker-verified sender
    letter = _take(bus, "test.dead")
    assert letter.properties.headers[REASON_HEADER] == BAD_REPLY_TO_REASON
    assert letter.properties.headers[ORIGINAL_USER_ID_HEADER] == "guest"
    assert "sent by 'guest'" in str(letter.properties.headers["x-fedmq-detail"])
    # and no reply was put in the named queue (only published models reach it)
    time.sleep(0.2)
    assert {d.kind for d in _drain(bus, VICTIM)} <= {"global_model"}
    assert service.core.version == 0


def test_replying_to_a_named_queue_is_refused_by_the_bus() -> None:
    # Given a request that names a queue as its reply address
    bus = InMemoryBus()
    bus.declare(follower_topology("t", "victim"))
    request = Delivery(
        body=b"",
        properties=MessageProperties(kind="join_request", reply_to=VICTIM),
        exchange=CONTROL_EXCHANGE,
        routing_key=join_key("t"),
        redelivered=False,
    )
    # When something tries to answer it, then the bus refuses
    with pytest.raises(ValueError, match="direct reply-to"):
        bus.reply(request, b"x", kind="join_accepted")
    assert bus.queue_depth(VICTIM) == 0


def test_sender_supplied_fedmq_headers_never_reach_a_dead_letter() -> None:
    # Given a message whose sender forged fedmq's own headers
    delivery = Delivery(
        body=b"x",
        properties=MessageProperties(
            kind="model_update",
            user_id="trainer-site-1",
            headers={
                SCHEMA_HEADER: SCHEMA_VERSION,
                "x-fedmq-original-user-id": "trainer-site-2",
                "X-FedMQ-Reason": "forged",
                "x-fedmq-anything": 1,
            },
        ),
        exchange="fedmq.updates",
        routing_key="update.t.trainer-site-1",
        redelivered=False,
    )
    # When its dead-letter copy is built
    headers = dead_letter_properties(delivery, reason="bad", detail="d").headers
    # Then only fedmq's values remain: the verified login, the real reason
    assert headers[ORIGINAL_USER_ID_HEADER] == "trainer-site-1"
    assert headers[REASON_HEADER] == "bad"
    assert "X-FedMQ-Reason" not in headers and "x-fedmq-anything" not in headers
    assert headers[SCHEMA_HEADER] == SCHEMA_VERSION


def test_a_dead_letter_of_an_unverified_sender_names_nobody() -> None:
    delivery = Delivery(
        body=b"x",
        properties=MessageProperties(headers={"x-fedmq-original-user-id": "trainer-site-2"}),
        exchange="fedmq.updates",
        routing_key="update.t.x",
        redelivered=False,
    )
    headers = dead_letter_properties(delivery, reason="bad", detail="").headers
    assert ORIGINAL_USER_ID_HEADER not in headers


class _NoDeadLetters(InMemoryBus):
    """A bus whose login may not write to the dead-letter exchange (a trainer's)."""

    def dead_letter(self, delivery: Delivery, *, reason: str, detail: str = "") -> None:
        from services.common.bus import AccessRefused

        raise AccessRefused("access to exchange 'fedmq.dlx' in vhost 'fedmq' refused")


def _model(task_id: str, version: int) -> GlobalModel:
    return GlobalModel(
        task_id=task_id,
        version=version,
        tensors=(Tensor.from_numpy("w", np.ones(SIZE, np.float32)),),
    )


def test_given_a_follower_that_may_not_dead_letter_when_garbage_arrives_then_it_is_dropped() -> (
    None
):
    # Given a follower queue holding garbage and a model of another task
    bus = _NoDeadLetters()
    bus.declare(follower_topology("t", "victim"))
    headers = {SCHEMA_HEADER: SCHEMA_VERSION}
    bus.publish("", VICTIM, b"\xc1garbage", kind="join_accepted", headers=headers)
    bus.publish(MODELS_EXCHANGE, model_key("t"), encode(_model("other", 9)), kind="global_model",
                headers=headers)  # fmt: skip
    follower = ModelFollower(bus, VICTIM, task_id="t")
    # When the follower drains it, then no error escapes and both are gone
    assert follower.newest(newer_than=None) is None
    assert bus.queue_depth(VICTIM) == 0
    # and a real model after them is still taken
    bus.publish(MODELS_EXCHANGE, model_key("t"), encode(_model("t", 3)), kind="global_model",
                headers=headers)  # fmt: skip
    newest = follower.newest(newer_than=None)
    assert newest is not None and newest.version == 3


def test_transport_errors_are_what_the_follower_survives() -> None:
    # The drop path catches the transport hierarchy, of which AccessRefused is part.
    from services.common.bus import AccessRefused

    assert issubclass(AccessRefused, TransportError)
