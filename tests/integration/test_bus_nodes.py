"""A bus given several broker nodes connects to the first that answers."""

from __future__ import annotations

import pytest

from services.common.bus import ConnectionLost
from services.common.bus.pika_bus import PikaBus
from services.common.bus.pika_connect import ReconnectPolicy
from services.common.topology import task_topology, update_key, updates_queue
from tests.conftest import BrokerNames
from tests.support.private_broker import free_port

pytestmark = pytest.mark.broker

ONE_TRY = ReconnectPolicy(initial_delay_s=0.1, max_delay_s=0.1, max_attempts=1)


def test_a_node_that_does_not_answer_passes_the_turn_to_the_next(
    amqp_url: str, broker_names: BrokerNames
) -> None:
    # Given a node list whose first node listens nowhere, then the real broker
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    task = broker_names.task_id()
    # When the bus opens and publishes with confirms
    with PikaBus([dead, amqp_url], connection_name="fedmq-test-nodes") as bus:
        bus.declare(task_topology(task))
        bus.publish("fedmq.updates", update_key(task, "site-a"), b"u1", kind="model_update")
        delivery = bus.get(updates_queue(task))
        # Then it reached the broker through the second node
        assert bus.is_connected and bus.connects == 1
        assert delivery is not None and delivery.body == b"u1"
        bus.ack(delivery)


def test_when_no_node_answers_the_error_names_every_node() -> None:
    # Given two nodes that listen nowhere
    ports = (free_port(), free_port())
    urls = [f"amqp://guest:guest@127.0.0.1:{port}/%2F" for port in ports]
    # When / Then
    with pytest.raises(ConnectionLost) as lost:
        PikaBus(urls, reconnect=ONE_TRY, connect_timeout=10)
    assert all(str(port) in str(lost.value) for port in ports)
    assert "guest:guest" not in str(lost.value)
