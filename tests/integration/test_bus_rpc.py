"""Request/reply over RabbitMQ's direct reply-to: how a trainer joins a task."""

from __future__ import annotations

import threading
import time

import pytest

from services.common.bus import Delivery, RpcTimeout, Unroutable
from services.common.bus.pika_bus import PikaBus
from services.common.topology import CONTROL_EXCHANGE, control_queue, join_key, task_topology
from tests.conftest import BrokerNames
from tests.integration.conftest import FAST_RECONNECT

pytestmark = pytest.mark.broker


def test_a_join_request_gets_the_reply_of_the_aggregator(
    amqp_url: str, bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given an aggregator (its own connection) answering join requests of a task
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    with PikaBus(amqp_url, reconnect=FAST_RECONNECT) as aggregator:

        def answer(request: Delivery) -> None:
            aggregator.reply(request, b"spec for " + request.body, kind="TaskSpec")
            aggregator.ack(request)

        aggregator.consume(control_queue(task), answer)
        # When a trainer calls twice, concurrently
        replies: dict[bytes, Delivery] = {}

        def join(who: bytes) -> None:
            replies[who] = bus.call(
                CONTROL_EXCHANGE, join_key(task), who, kind="JoinRequest", timeout=10
            )

        callers = [threading.Thread(target=join, args=(who,)) for who in (b"site-a", b"site-b")]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(15)
    # Then each caller got its own answer
    assert {who: (r.body, r.kind) for who, r in replies.items()} == {
        b"site-a": (b"spec for site-a", "TaskSpec"),
        b"site-b": (b"spec for site-b", "TaskSpec"),
    }


def test_a_request_nobody_answers_times_out(bus: PikaBus, broker_names: BrokerNames) -> None:
    # Given a control queue without an aggregator
    task = broker_names.task_id()
    bus.declare(task_topology(task))
    started = time.monotonic()
    # When a trainer calls with a short timeout
    with pytest.raises(RpcTimeout, match="no reply"):
        bus.call(CONTROL_EXCHANGE, join_key(task), b"", kind="JoinRequest", timeout=0.5)
    # Then it gave up close to its timeout, and the request waits in the queue (TTL'd)
    assert 0.4 <= time.monotonic() - started < 5
    assert bus.queue_depth(control_queue(task)) == 1


def test_a_request_for_an_undeclared_task_is_unroutable(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    bus.declare(task_topology(broker_names.task_id()))
    with pytest.raises(Unroutable):
        bus.call(CONTROL_EXCHANGE, join_key(broker_names.id("ghost")), b"", kind="J", timeout=5)
