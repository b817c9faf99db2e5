"""Publishing with confirms on the real broker: what arrives, what is refused, and why."""

from __future__ import annotations

import queue
import time

import pytest

from services.common.bus import (
    CONTENT_TYPE,
    Delivery,
    NotFound,
    PreconditionFailed,
    PublishRefused,
    Unroutable,
)
from services.common.bus.pika_bus import PikaBus
from services.common.topology import (
    MODELS_EXCHANGE,
    UPDATES_EXCHANGE,
    follower_queue,
    follower_topology,
    model_key,
    task_topology,
    update_key,
    updates_queue,
)
from tests.conftest import BrokerNames

pytestmark = pytest.mark.broker


def test_a_published_update_arrives_intact_with_its_properties(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a task queue with a consumer
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    received: queue.Queue[Delivery] = queue.Queue()

    def handler(delivery: Delivery) -> None:
        received.put(delivery)
        bus.ack(delivery)

    bus.consume(updates_queue(task), handler)
    body = bytes(range(256)) * 64
    before = int(time.time())
    # When a trainer publishes an update
    message_id = bus.publish(
        UPDATES_EXCHANGE,
        update_key(task, "site-a"),
        body,
        kind="ModelUpdate",
        headers={"fedmq-schema": 1},
        user_id="guest",
        correlation_id="corr-1",
    )
    # Then it arrives byte for byte, with every property
    delivery = received.get(timeout=10)
    props = delivery.properties
    assert delivery.body == body
    assert (delivery.exchange, delivery.routing_key) == (UPDATES_EXCHANGE, f"update.{task}.site-a")
    assert not delivery.redelivered
    assert props.content_type == CONTENT_TYPE == "application/x-msgpack"
    assert props.kind == "ModelUpdate"
    assert props.message_id == message_id and len(message_id) == 32
    assert props.headers == {"fedmq-schema": 1}
    assert props.user_id == "guest"
    assert props.correlation_id == "corr-1"
    assert props.persistent
    assert props.timestamp is not None and before <= props.timestamp <= int(time.time())


def test_a_follower_queue_holds_only_the_newest_of_several_models(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a follower queue of a task
    task, follower = broker_names.task_id(), broker_names.id("site")
    name = broker_names.track_queue(follower_queue(task, follower).name)
    bus.declare(follower_topology(task, follower))
    # When the aggregator publishes three versions
    for version in (1, 2, 3):
        bus.publish(MODELS_EXCHANGE, model_key(task), b"model v%d" % version, kind="GlobalModel")
    # Then the follower holds one message, the newest
    assert bus.queue_depth(name) == 1
    newest = bus.get(name)
    assert newest is not None and newest.body == b"model v3"
    bus.ack(newest)
    assert bus.get(name) is None


def test_publishing_to_a_full_updates_queue_raises_and_drops_nothing(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given an updates queue limited to 1000 bytes that already holds 600
    task = broker_names.task_id()
    bus.declare(task_topology(task, max_update_bytes=1000))
    bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"a" * 600, kind="ModelUpdate")
    assert bus.queue_depth(updates_queue(task)) == 1
    # When 600 more bytes are published
    with pytest.raises(PublishRefused, match="reject-publish"):
        bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"b" * 600, kind="ModelUpdate")
    # Then the queue is unchanged: the first update is still there, nothing was silently dropped
    assert bus.queue_depth(updates_queue(task)) == 1
    first = bus.get(updates_queue(task))
    assert first is not None and first.body == b"a" * 600
    bus.ack(first)
    # And once there is room again, publishing works on the same bus
    bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"c" * 600, kind="ModelUpdate")
    assert bus.queue_depth(updates_queue(task)) == 1


def test_a_mandatory_message_nobody_is_bound_for_is_unroutable(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    bus.declare(task_topology(broker_names.task_id()))
    with pytest.raises(Unroutable, match="no queue is bound"):
        bus.publish(
            MODELS_EXCHANGE, model_key(broker_names.id("nobody")), b"m", kind="X", mandatory=True
        )


def test_a_user_id_other_than_the_login_is_refused_by_the_broker(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a task queue
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    # When a message claims to come from another user
    with pytest.raises(PreconditionFailed, match="user_id"):
        bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"", kind="X", user_id="mallory")
    # Then nothing was queued, and honest publishing still works
    assert bus.queue_depth(updates_queue(task)) == 0
    bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"", kind="X", user_id="guest")
    assert bus.queue_depth(updates_queue(task)) == 1


def test_publishing_to_a_missing_exchange_is_not_found(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    with pytest.raises(NotFound, match="no exchange"):
        bus.publish(broker_names.exchange("missing"), "k", b"", kind="X")
