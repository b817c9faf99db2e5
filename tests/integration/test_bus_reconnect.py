"""Recovery: the broker stops and starts again, the bus reconnects and goes on consuming."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from structlog.testing import capture_logs

from services.common.bus import ConnectionLost, Delivery
from services.common.bus.pika_bus import PikaBus
from services.common.bus.pika_connect import (
    RECONNECT_MAX_ATTEMPTS,
    RECONNECT_MAX_DELAY_S,
    ReconnectPolicy,
)
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
from tests.integration.conftest import FAST_RECONNECT, broker_stopped, wait_for

RECONNECT_TIMEOUT_S = 90.0


def test_backoff_grows_exponentially_up_to_its_cap() -> None:
    policy = ReconnectPolicy(initial_delay_s=0.5, max_delay_s=4.0, multiplier=2.0, jitter=0.0)
    assert [policy.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.delay(10_000) == 4.0  # no overflow after a long outage


def test_jitter_only_ever_shortens_the_pause_by_at_most_its_fraction() -> None:
    policy = ReconnectPolicy(initial_delay_s=1.0, max_delay_s=1.0, jitter=0.5)
    assert policy.delay(0, rand=lambda: 0.0) == 1.0
    assert policy.delay(0, rand=lambda: 0.999) == pytest.approx(0.5005)


def test_the_default_policy_is_bounded() -> None:
    policy = ReconnectPolicy()
    assert policy.max_attempts == RECONNECT_MAX_ATTEMPTS < 1000
    assert policy.max_delay_s == RECONNECT_MAX_DELAY_S


@pytest.mark.parametrize(
    "bad",
    [
        {"initial_delay_s": 0.0},
        {"initial_delay_s": 5.0, "max_delay_s": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"max_attempts": 0},
    ],
)
def test_nonsensical_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReconnectPolicy(**bad)  # type: ignore[arg-type]


def test_a_bus_that_cannot_reach_the_broker_gives_up_after_its_connect_timeout() -> None:
    # Given a URL where nothing listens (port 1 on loopback refuses at once)
    started = time.monotonic()
    # When a bus is created with a 1 s connect timeout, it raises instead of hanging
    with pytest.raises(ConnectionLost, match="within 1s"):
        PikaBus("amqp://guest:guest@127.0.0.1:1/%2F", reconnect=FAST_RECONNECT, connect_timeout=1)
    assert time.monotonic() - started < 5


@pytest.mark.broker
@pytest.mark.slow
def test_the_bus_reconnects_after_a_broker_restart_and_goes_on_consuming(
    bus: PikaBus, broker_names: BrokerNames
) -> None:
    # Given a consumer on a task queue, and a model taken from a follower queue but not acked
    task, follower = broker_names.task_id(), broker_names.id("site")
    follow = broker_names.track_queue(follower_queue(task, follower).name)
    bus.declare(task_topology(task).merge(follower_topology(task, follower)))
    received: queue.Queue[bytes] = queue.Queue()

    def handler(delivery: Delivery) -> None:
        received.put(delivery.body)
        bus.ack(delivery)

    bus.consume(updates_queue(task), handler)
    bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"before", kind="ModelUpdate")
    assert received.get(timeout=10) == b"before"
    bus.publish(MODELS_EXCHANGE, model_key(task), b"model v1", kind="GlobalModel")
    stale = bus.get(follow)
    assert stale is not None and not stale.redelivered
    late_publish: queue.Queue[BaseException | str] = queue.Queue()

    # When the broker stops...
    with broker_stopped():
        wait_for(lambda: not bus.is_connected, timeout=30, what="the bus to notice")
        # ...a publish with a short timeout gives up with ConnectionLost,
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"lost", kind="X", timeout=1.0)
        assert 0.9 <= time.monotonic() - started < 10
        # ...while one with a long timeout waits for the broker to come back
        waiting = threading.Thread(
            target=_publish_into,
            args=(bus, late_publish, update_key(task, "a"), b"during"),
            daemon=True,
        )
        waiting.start()
        time.sleep(0.5)
    # ...and starts again
    wait_for(lambda: bus.connects == 2, timeout=RECONNECT_TIMEOUT_S, what="the reconnect")

    # Then the waiting publish went through and the re-registered consumer received it
    waiting.join(RECONNECT_TIMEOUT_S)
    assert late_publish.get(timeout=1) == "confirmed"
    assert received.get(timeout=30) == b"during"
    # And new messages keep flowing to it
    bus.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"after", kind="ModelUpdate")
    assert received.get(timeout=30) == b"after"
    assert received.empty()  # the refused "lost" message never arrived

    # And the ack of the delivery from the dead connection is dropped with a log line...
    with capture_logs() as logs:
        bus.ack(stale)
    assert any(str(e["event"]).startswith("ack dropped") for e in logs), logs
    # ...because the broker kept the message and delivers it again
    again = bus.get(follow)
    assert again is not None
    assert (again.body, again.redelivered) == (b"model v1", True)
    bus.ack(again)


def _publish_into(
    bus: PikaBus, outcome: queue.Queue[BaseException | str], key: str, body: bytes
) -> None:
    try:
        bus.publish(UPDATES_EXCHANGE, key, body, kind="ModelUpdate", timeout=RECONNECT_TIMEOUT_S)
    except BaseException as exc:  # reported to the test thread
        outcome.put(exc)
    else:
        outcome.put("confirmed")
