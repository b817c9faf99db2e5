"""Dead-lettering on the real broker: poison lands in `fedmq.dead` with a readable reason."""

from __future__ import annotations

import queue

import pytest

from services.common.bus import AlreadySettled, Delivery
from services.common.bus.base import HANDLER_ERROR_REASON
from services.common.bus.pika_bus import PikaBus
from services.common.topology import (
    DEAD_QUEUE,
    DETAIL_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    ORIGINAL_USER_ID_HEADER,
    REASON_HEADER,
    UPDATES_EXCHANGE,
    task_topology,
    update_key,
    updates_queue,
)
from tests.conftest import BrokerNames
from tests.integration.conftest import take_message

pytestmark = pytest.mark.broker


def _depth_after_close(url: str, queue_name: str) -> int:
    with PikaBus(url) as other:
        return other.queue_depth(queue_name)


def test_dead_letter_lands_in_the_dead_queue_with_reason_and_original_labels(
    amqp_url: str, bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given an update taken from a task queue
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    message_id = bus.publish(
        UPDATES_EXCHANGE,
        update_key(task, "site-a"),
        b"\xc1 not msgpack",
        kind="ModelUpdate",
        headers={"fedmq-schema": 1},
        user_id="guest",
    )
    delivery = bus.get(updates_queue(task))
    assert delivery is not None
    # When the aggregator dead-letters it
    bus.dead_letter(delivery, reason="not-msgpack", detail="byte 0xc1 is never used")
    # Then fedmq.dead holds a persistent copy with the reason and where it came from
    dead = take_message(amqp_url, DEAD_QUEUE, message_id)
    assert dead is not None, "the dead letter never reached fedmq.dead"
    headers = dead.properties.headers
    assert dead.body == b"\xc1 not msgpack"
    assert dead.properties.type == "ModelUpdate"
    assert dead.properties.delivery_mode == 2
    assert headers[REASON_HEADER] == "not-msgpack"
    assert headers[DETAIL_HEADER] == "byte 0xc1 is never used"
    assert headers[ORIGINAL_EXCHANGE_HEADER] == UPDATES_EXCHANGE
    assert headers[ORIGINAL_ROUTING_KEY_HEADER] == f"update.{task}.site-a"
    assert headers[ORIGINAL_USER_ID_HEADER] == "guest"
    assert headers["fedmq-schema"] == 1
    # And the original was acknowledged: it cannot be settled again, and closing the
    # connection (which would requeue an unacked message) leaves the task queue empty
    with pytest.raises(AlreadySettled):
        bus.ack(delivery)
    bus.close()
    assert _depth_after_close(amqp_url, updates_queue(task)) == 0


def test_reject_goes_to_the_dead_queue_through_the_queue_dead_letter_exchange(
    amqp_url: str, bus: PikaBus, broker_names: BrokerNames
) -> None:
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    message_id = bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"r", kind="ModelUpdate")
    delivery = bus.get(updates_queue(task))
    assert delivery is not None
    bus.reject(delivery)
    dead = take_message(amqp_url, DEAD_QUEUE, message_id)
    assert dead is not None
    [death] = dead.properties.headers["x-death"]
    assert (death["reason"], death["queue"]) == ("rejected", updates_queue(task))
    bus.close()
    assert _depth_after_close(amqp_url, updates_queue(task)) == 0


def test_a_handler_that_raises_has_its_message_dead_lettered_and_the_consumer_continues(
    amqp_url: str, bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a consumer whose handler fails on one message
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    handled: queue.Queue[bytes] = queue.Queue()

    def handler(delivery: Delivery) -> None:
        if delivery.body == b"poison":
            raise ValueError("cannot digest this")
        handled.put(delivery.body)
        bus.ack(delivery)

    tag = bus.consume(updates_queue(task), handler)
    # When the poison comes first, then a good message
    poison_id = bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"poison", kind="X")
    bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"good", kind="X")
    # Then the good one is handled and the poison is in fedmq.dead with the error
    assert handled.get(timeout=10) == b"good"
    dead = take_message(amqp_url, DEAD_QUEUE, poison_id)
    assert dead is not None
    assert dead.properties.headers[REASON_HEADER] == HANDLER_ERROR_REASON
    assert dead.properties.headers[DETAIL_HEADER] == "ValueError: cannot digest this"
    # And both were settled: cancelling (which requeues unacked messages) leaves none behind
    bus.cancel(tag)
    assert bus.queue_depth(updates_queue(task)) == 0
