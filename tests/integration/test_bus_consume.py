"""Consuming on the real broker: handlers off the connection thread, in order, manual acks."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from services.common.bus import AlreadySettled, ConnectionLost, Delivery, NotFound
from services.common.bus.pika_bus import PikaBus
from services.common.topology import UPDATES_EXCHANGE, task_topology, update_key, updates_queue
from tests.conftest import BrokerNames
from tests.integration.conftest import FAST_RECONNECT

pytestmark = pytest.mark.broker

SHORT_HEARTBEAT_S = 1
SLOW_HANDLER_S = 4.0  # four heartbeat intervals: a blocked connection thread would be dropped


def test_a_slow_handler_runs_off_the_connection_thread_and_heartbeats_keep_flowing(
    amqp_url: str, broker_names: BrokerNames
) -> None:
    # Given a bus with a 1 s heartbeat and a handler that works for 4 s before acking
    task = broker_names.task_id()
    done: queue.Queue[tuple[threading.Thread, bool]] = queue.Queue()
    with PikaBus(
        amqp_url,
        heartbeat=SHORT_HEARTBEAT_S,
        reconnect=FAST_RECONNECT,
        topology=task_topology(task),
    ) as bus:

        def slow(delivery: Delivery) -> None:
            time.sleep(SLOW_HANDLER_S)
            bus.ack(delivery)
            done.put((threading.current_thread(), delivery.redelivered))

        tag = bus.consume(updates_queue(task), slow)
        # When one update arrives
        bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"u", kind="ModelUpdate")
        thread, redelivered = done.get(timeout=SLOW_HANDLER_S + 10)
        bus.cancel(tag)
        # Then the handler ran on a worker thread, never on the connection's
        assert thread is not bus.io_thread
        assert thread.name == f"fedmq-consumer-{updates_queue(task)}"
        # And the connection survived (no reconnect), so the ack took: nothing comes back
        assert not redelivered
        assert bus.connects == 1
        assert bus.queue_depth(updates_queue(task)) == 0


def test_deliveries_for_one_consumer_are_handled_in_publish_order(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a consumer with a prefetch larger than one
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    seen: list[bytes] = []
    all_seen = threading.Event()
    total = 50

    def record(delivery: Delivery) -> None:
        seen.append(delivery.body)
        bus.ack(delivery)
        if len(seen) == total:
            all_seen.set()

    bus.consume(updates_queue(task), record, prefetch=16)
    # When fifty updates are published
    for i in range(total):
        bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"%03d" % i, kind="X")
    # Then they are handled one at a time, in order
    assert all_seen.wait(20)
    assert seen == [b"%03d" % i for i in range(total)]


def test_cancel_gives_back_what_the_consumer_held_without_acking(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a consumer that keeps its deliveries unacked
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    held: queue.Queue[Delivery] = queue.Queue()
    tag = bus.consume(updates_queue(task), held.put, prefetch=2)
    for body in (b"1", b"2"):
        bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), body, kind="X")
    first, second = held.get(timeout=10), held.get(timeout=10)
    bus.ack(first)
    # When the consumer is cancelled
    bus.cancel(tag)
    # Then the unacked one is back in the queue, marked redelivered; a late ack is harmless
    bus.ack(second)
    again = bus.get(updates_queue(task))
    assert again is not None
    assert (again.body, again.redelivered) == (b"2", True)
    bus.ack(again)
    assert bus.queue_depth(updates_queue(task)) == 0


def test_consuming_a_missing_queue_is_not_found_and_the_bus_goes_on(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    with pytest.raises(NotFound, match="no queue"):
        bus.consume(broker_names.queue("missing"), lambda _delivery: None)
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    assert bus.queue_depth(updates_queue(task)) == 0


def test_a_closed_bus_refuses_new_work_with_connection_lost(
    amqp_url: str, broker_names: BrokerNames
) -> None:
    bus = PikaBus(amqp_url, reconnect=FAST_RECONNECT)
    bus.close()
    bus.close()  # idempotent
    with pytest.raises(ConnectionLost, match="closed"):
        bus.publish(UPDATES_EXCHANGE, update_key(broker_names.id(), "a"), b"", kind="X")
    assert not bus.io_thread.is_alive()


def test_ack_all_settles_every_held_delivery_in_one_call_and_refuses_a_second_ack(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a consumer holding five unacked deliveries
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    held: queue.Queue[Delivery] = queue.Queue()
    tag = bus.consume(updates_queue(task), held.put, prefetch=8)
    for i in range(5):
        bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"%d" % i, kind="X")
    deliveries = [held.get(timeout=10) for _ in range(5)]
    # When all five are acked at once
    bus.ack_all(deliveries)
    # Then none comes back when the consumer goes away, and each counts as settled
    bus.cancel(tag)
    assert bus.get(updates_queue(task)) is None
    assert bus.queue_depth(updates_queue(task)) == 0
    with pytest.raises(AlreadySettled):
        bus.ack_all(deliveries[:1])
