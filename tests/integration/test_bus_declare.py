"""Declaring the topology on the real broker: idempotent, and the arguments really apply."""

from __future__ import annotations

import pika
import pytest

from services.common.bus import NotFound, PreconditionFailed
from services.common.bus.pika_bus import PikaBus
from services.common.topology import (
    DEAD_QUEUE,
    follower_queue,
    follower_topology,
    task_topology,
)
from tests.conftest import BrokerNames

pytestmark = pytest.mark.broker


def _queue_exists(url: str, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()
    return True


def test_declaring_a_task_topology_twice_succeeds_and_creates_its_queues(
    amqp_url: str, bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a task nobody declared yet
    task = broker_names.task_id()
    topology = task_topology(task)
    assert not _queue_exists(amqp_url, f"fedmq.{task}.updates")
    # When it is declared twice
    bus.declare(topology)
    bus.declare(topology)
    # Then every queue of the topology exists, and each is empty
    for queue in topology.queues:
        assert _queue_exists(amqp_url, queue.name), queue.name
    assert bus.queue_depth(f"fedmq.{task}.updates") == 0
    assert bus.queue_depth(f"fedmq.{task}.control") == 0


def test_redeclaring_a_queue_with_a_different_byte_limit_is_a_precondition_failure(
    amqp_url: str, bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a task declared with a 1000-byte update queue
    task = broker_names.task_id()
    bus.declare(task_topology(task, max_update_bytes=1000))
    # When another process declares it with 2000 bytes
    with PikaBus(amqp_url) as other:
        with pytest.raises(PreconditionFailed, match="x-max-length-bytes"):
            other.declare(task_topology(task, max_update_bytes=2000))
        # Then the broker refused (the limit really applies), and that bus still works
        assert other.queue_depth(f"fedmq.{task}.updates") == 0


def test_one_bus_refuses_to_redeclare_a_name_with_other_settings_before_asking_the_broker(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    task = broker_names.task_id()
    bus.declare(task_topology(task, max_update_bytes=1000))
    with pytest.raises(ValueError, match="different settings"):
        bus.declare(task_topology(task, max_update_bytes=2000))


def test_a_follower_topology_declares_its_follower_queue(
    amqp_url: str, bus: PikaBus, broker_names: BrokerNames
) -> None:
    task, follower = broker_names.task_id(), broker_names.id("site")
    name = broker_names.track_queue(follower_queue(task, follower).name)
    bus.declare(follower_topology(task, follower))
    assert _queue_exists(amqp_url, name)


def test_depth_of_a_missing_queue_is_not_found(bus: PikaBus, broker_names: BrokerNames) -> None:
    with pytest.raises(NotFound, match="no queue"):
        bus.queue_depth(broker_names.queue("missing"))
    # and the bus's admin channel recovers for the next call
    assert bus.queue_depth(DEAD_QUEUE) >= 0
