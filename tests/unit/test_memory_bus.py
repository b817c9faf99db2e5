"""InMemoryBus keeps the broker semantics services rely on, so their unit tests mean something."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from services.common.bus import (
    CONTENT_TYPE,
    AlreadySettled,
    ConnectionLost,
    Delivery,
    InMemoryBus,
    NotFound,
    PreconditionFailed,
    PublishRefused,
    RpcTimeout,
    Unroutable,
)
from services.common.bus.base import HANDLER_ERROR_REASON, MAX_DETAIL_CHARS
from services.common.bus.memory import topic_matches
from services.common.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    DETAIL_HEADER,
    EVENTS_EXCHANGE,
    MODELS_EXCHANGE,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    ORIGINAL_USER_ID_HEADER,
    REASON_HEADER,
    UPDATES_EXCHANGE,
    BindingSpec,
    QueueSpec,
    Topology,
    control_queue,
    event_key,
    events_queue,
    follower_queue,
    join_key,
    model_key,
    task_topology,
    update_key,
    updates_queue,
)

TASK = "mnist"


@pytest.fixture
def bus() -> Iterator[InMemoryBus]:
    with InMemoryBus(topology=task_topology(TASK, max_update_bytes=1000)) as memory:
        yield memory


def _collect(bus: InMemoryBus, queue: str, *, ack: bool = True) -> list[Delivery]:
    seen: list[Delivery] = []

    def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        if ack:
            bus.ack(delivery)

    bus.consume(queue, handler)
    return seen


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("update.t.*", "update.t.a", True),
        ("update.t.*", "update.t", False),
        ("update.t.*", "update.t.a.b", False),
        ("#", "anything.at.all", True),
        ("heartbeat.#", "heartbeat", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.z", True),
        ("*.t", "eval.t", True),
        ("*.t", "eval.u", False),
        ("model.t", "model.t", True),
    ],
)
def test_topic_patterns_match_like_rabbitmq(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_a_published_update_reaches_the_task_queue_with_its_properties(bus: InMemoryBus) -> None:
    # Given
    seen = _collect(bus, updates_queue(TASK))
    # When
    message_id = bus.publish(
        UPDATES_EXCHANGE,
        update_key(TASK, "site-a"),
        b"\x81\xa1k\x01",
        kind="ModelUpdate",
        headers={"fedmq-schema": 1},
        user_id="guest",
    )
    bus.join()
    # Then
    [delivery] = seen
    assert delivery.body == b"\x81\xa1k\x01"
    assert delivery.kind == "ModelUpdate"
    assert delivery.message_id == message_id
    assert delivery.properties.content_type == CONTENT_TYPE
    assert delivery.properties.headers == {"fedmq-schema": 1}
    assert delivery.properties.user_id == "guest"
    assert delivery.properties.persistent
    assert delivery.exchange == UPDATES_EXCHANGE
    assert delivery.routing_key == "update.mnist.site-a"
    assert not delivery.redelivered


def test_an_update_for_another_task_does_not_reach_this_task_queue(bus: InMemoryBus) -> None:
    bus.declare(task_topology("other"))
    bus.publish(UPDATES_EXCHANGE, update_key("other", "site-a"), b"x", kind="ModelUpdate")
    assert bus.queue_depth(updates_queue(TASK)) == 0
    assert bus.queue_depth(updates_queue("other")) == 1


def test_direct_exchange_routes_join_requests_by_exact_key(bus: InMemoryBus) -> None:
    bus.publish(CONTROL_EXCHANGE, join_key(TASK), b"j", kind="JoinRequest")
    bus.publish(CONTROL_EXCHANGE, "join.mnist.extra", b"j", kind="JoinRequest")
    assert bus.queue_depth(control_queue(TASK)) == 1


def test_fanout_dead_letter_exchange_copies_to_every_bound_queue(bus: InMemoryBus) -> None:
    tap = QueueSpec("tap", durable=False, bindings=(BindingSpec(DEAD_LETTER_EXCHANGE, ""),))
    bus.declare(Topology(queues=(tap,)))
    bus.publish(DEAD_LETTER_EXCHANGE, "whatever", b"d", kind="ModelUpdate")
    assert (bus.queue_depth(DEAD_QUEUE), bus.queue_depth("tap")) == (1, 1)


def test_a_follower_queue_holds_only_the_newest_of_several_models(bus: InMemoryBus) -> None:
    # Given
    bus.declare(Topology(queues=(follower_queue(TASK, "site-a"),)))
    name = follower_queue(TASK, "site-a").name
    # When three versions are published
    for version in (1, 2, 3):
        bus.publish(MODELS_EXCHANGE, model_key(TASK), f"v{version}".encode(), kind="GlobalModel")
    # Then the follower holds only v3
    assert bus.queue_depth(name) == 1
    newest = bus.get(name)
    assert newest is not None and newest.body == b"v3"
    bus.ack(newest)
    assert bus.get(name) is None


def test_a_full_updates_queue_refuses_the_publish_and_keeps_what_it_had(bus: InMemoryBus) -> None:
    # Given 600 of the 1000 allowed bytes are waiting
    bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"x" * 600, kind="ModelUpdate")
    # When another 600 bytes arrive
    with pytest.raises(PublishRefused):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"y" * 600, kind="ModelUpdate")
    # Then the refusal dropped nothing, and a message that fits is still accepted
    assert bus.queue_depth(updates_queue(TASK)) == 1
    bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"z" * 400, kind="ModelUpdate")
    assert bus.queue_depth(updates_queue(TASK)) == 2


def test_dead_letter_copies_the_message_with_reason_headers_then_acks(bus: InMemoryBus) -> None:
    # Given an update received from a trainer
    message_id = bus.publish(
        UPDATES_EXCHANGE,
        update_key(TASK, "a"),
        b"bad",
        kind="ModelUpdate",
        headers={"fedmq-schema": 1},
        user_id="guest",
    )
    delivery = bus.get(updates_queue(TASK))
    assert delivery is not None
    # When the aggregator dead-letters it
    bus.dead_letter(delivery, reason="nan-or-inf", detail="x" * (MAX_DETAIL_CHARS + 10))
    # Then fedmq.dead holds a copy with the reason and the original labels
    dead = bus.get(DEAD_QUEUE)
    assert dead is not None
    headers = dead.properties.headers
    assert dead.body == b"bad"
    assert dead.message_id == message_id and dead.kind == "ModelUpdate"
    assert headers[REASON_HEADER] == "nan-or-inf"
    assert headers[DETAIL_HEADER] == "x" * MAX_DETAIL_CHARS
    assert headers[ORIGINAL_EXCHANGE_HEADER] == UPDATES_EXCHANGE
    assert headers[ORIGINAL_ROUTING_KEY_HEADER] == "update.mnist.a"
    assert headers[ORIGINAL_USER_ID_HEADER] == "guest"
    assert headers["fedmq-schema"] == 1
    # And the original is gone (acked): nothing comes back
    assert bus.queue_depth(updates_queue(TASK)) == 0
    with pytest.raises(AlreadySettled):
        bus.ack(delivery)


def test_dead_letter_without_a_dead_letter_exchange_fails_and_leaves_it_unsettled() -> None:
    # Given a bus where only a plain queue exists
    bus = InMemoryBus(topology=Topology(queues=(QueueSpec("plain", durable=True),)))
    bus.publish("", "plain", b"m", kind="X")
    delivery = bus.get("plain")
    assert delivery is not None
    # When dead-lettering finds no fedmq.dlx
    with pytest.raises(NotFound):
        bus.dead_letter(delivery, reason="r")
    # Then the delivery can still be acknowledged
    bus.ack(delivery)


def test_reject_sends_the_message_to_the_queue_dead_letter_exchange_with_x_death(
    bus: InMemoryBus,
) -> None:
    bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"r", kind="ModelUpdate")
    delivery = bus.get(updates_queue(TASK))
    assert delivery is not None
    bus.reject(delivery)
    dead = bus.get(DEAD_QUEUE)
    assert dead is not None and dead.body == b"r"
    death = dead.properties.headers["x-death"]
    assert isinstance(death, list)
    assert death[0]["reason"] == "rejected"
    assert death[0]["queue"] == updates_queue(TASK)


def test_unroutable_mandatory_message_raises_and_a_plain_one_is_dropped(bus: InMemoryBus) -> None:
    with pytest.raises(Unroutable):
        bus.publish(MODELS_EXCHANGE, model_key("nobody"), b"m", kind="GlobalModel", mandatory=True)
    bus.publish(MODELS_EXCHANGE, model_key("nobody"), b"m", kind="GlobalModel")


def test_publishing_to_an_unknown_exchange_is_not_found(bus: InMemoryBus) -> None:
    with pytest.raises(NotFound):
        bus.publish("no.such.exchange", "k", b"", kind="X")


def test_a_user_id_other_than_the_login_is_refused_like_the_broker_does(bus: InMemoryBus) -> None:
    with pytest.raises(PreconditionFailed, match="authenticated user"):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"", kind="X", user_id="mallory")
    assert bus.queue_depth(updates_queue(TASK)) == 0


def test_headers_amqp_cannot_carry_are_refused_before_publishing(bus: InMemoryBus) -> None:
    with pytest.raises(TypeError, match="header 'when'"):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"", kind="X", headers={"when": {1}})


def test_handlers_run_in_order_on_a_worker_thread(bus: InMemoryBus) -> None:
    # Given a consumer that records the thread it runs on
    seen: list[tuple[bytes, str]] = []

    def handler(delivery: Delivery) -> None:
        seen.append((delivery.body, threading.current_thread().name))
        bus.ack(delivery)

    bus.consume(updates_queue(TASK), handler)
    # When ten messages are published from the test thread
    for i in range(10):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), str(i).encode(), kind="X")
    bus.join()
    # Then they were handled in order, never on the publishing thread
    assert [body for body, _ in seen] == [str(i).encode() for i in range(10)]
    assert {thread for _, thread in seen} == {f"fedmq-consumer-{updates_queue(TASK)}"}


def test_a_consumer_never_holds_more_than_its_prefetch(bus: InMemoryBus) -> None:
    # Given a consumer with prefetch 2 that never acks
    held: list[Delivery] = []
    bus.consume(updates_queue(TASK), held.append, prefetch=2)
    # When five messages are waiting
    for i in range(5):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), bytes([i]), kind="X")
    bus.join()
    # Then it got two; acking one lets exactly one more through
    assert [d.body for d in held] == [b"\x00", b"\x01"]
    assert bus.queue_depth(updates_queue(TASK)) == 3
    bus.ack(held[0])
    bus.join()
    assert [d.body for d in held] == [b"\x00", b"\x01", b"\x02"]


def test_cancel_requeues_unsettled_deliveries_as_redelivered_in_order(bus: InMemoryBus) -> None:
    held: list[Delivery] = []
    tag = bus.consume(updates_queue(TASK), held.append, prefetch=3)
    for i in range(3):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), bytes([i]), kind="X")
    bus.join()
    bus.ack(held[0])
    # When the consumer is cancelled holding two unacked deliveries
    bus.cancel(tag)
    # Then those two are back at the head, flagged redelivered, and late acks are dropped
    again = [bus.get(updates_queue(TASK)) for _ in range(2)]
    assert [(d.body, d.redelivered) for d in again if d] == [(b"\x01", True), (b"\x02", True)]
    bus.ack(held[1])
    assert bus.queue_depth(updates_queue(TASK)) == 0


def test_a_handler_that_raises_gets_its_message_dead_lettered_and_the_consumer_goes_on(
    bus: InMemoryBus,
) -> None:
    # Given a handler that fails on "boom"
    handled: list[bytes] = []

    def handler(delivery: Delivery) -> None:
        if delivery.body == b"boom":
            raise RuntimeError("kaput")
        handled.append(delivery.body)
        bus.ack(delivery)

    bus.consume(updates_queue(TASK), handler)
    # When a poison message is followed by a good one
    bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"boom", kind="X")
    bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"fine", kind="X")
    bus.join()
    # Then the poison sits in fedmq.dead with the error, and the good one was handled
    dead = bus.get(DEAD_QUEUE)
    assert dead is not None and dead.body == b"boom"
    assert dead.properties.headers[REASON_HEADER] == HANDLER_ERROR_REASON
    assert dead.properties.headers[DETAIL_HEADER] == "RuntimeError: kaput"
    assert handled == [b"fine"]


def test_settling_a_delivery_twice_is_an_error(bus: InMemoryBus) -> None:
    bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"m", kind="X")
    delivery = bus.get(updates_queue(TASK))
    assert delivery is not None
    bus.ack(delivery)
    with pytest.raises(AlreadySettled):
        bus.reject(delivery)


def test_call_returns_the_reply_published_by_the_responder(bus: InMemoryBus) -> None:
    # Given an aggregator answering join requests
    def answer(request: Delivery) -> None:
        bus.reply(request, b"spec for " + request.body, kind="TaskSpec")
        bus.ack(request)

    bus.consume(control_queue(TASK), answer)
    # When a trainer calls
    reply = bus.call(CONTROL_EXCHANGE, join_key(TASK), b"site-a", kind="JoinRequest", timeout=2)
    # Then it gets the answer
    assert (reply.body, reply.kind) == (b"spec for site-a", "TaskSpec")
    bus.ack(reply)  # an auto-acknowledged reply: settling it is harmless


def test_call_without_a_responder_times_out(bus: InMemoryBus) -> None:
    started = time.monotonic()
    with pytest.raises(RpcTimeout):
        bus.call(CONTROL_EXCHANGE, join_key(TASK), b"", kind="JoinRequest", timeout=0.2)
    assert time.monotonic() - started < 2.0


def test_call_to_a_task_nobody_serves_is_unroutable(bus: InMemoryBus) -> None:
    with pytest.raises(Unroutable):
        bus.call(CONTROL_EXCHANGE, join_key("ghost"), b"", kind="JoinRequest", timeout=1)


def test_redeclaring_a_queue_with_other_arguments_is_refused(bus: InMemoryBus) -> None:
    bus.declare(task_topology(TASK, max_update_bytes=1000))  # same: fine
    with pytest.raises(PreconditionFailed):
        bus.declare(task_topology(TASK, max_update_bytes=2000))


def test_binding_to_a_missing_exchange_is_not_found() -> None:
    bus = InMemoryBus()
    with pytest.raises(NotFound):
        bus.declare(Topology(queues=(follower_queue(TASK, "a"),)))


def test_queue_operations_on_a_missing_queue_are_not_found(bus: InMemoryBus) -> None:
    with pytest.raises(NotFound):
        bus.queue_depth("nope")
    with pytest.raises(NotFound):
        bus.get("nope")


def test_purge_and_delete_report_how_many_messages_they_dropped(bus: InMemoryBus) -> None:
    for _ in range(3):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"m", kind="X")
    assert bus.purge(updates_queue(TASK)) == 3
    bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"m", kind="X")
    assert bus.delete_queue(updates_queue(TASK)) == 1
    assert bus.delete_queue(updates_queue(TASK)) == 0
    with pytest.raises(NotFound):
        bus.queue_depth(updates_queue(TASK))


def test_events_reach_a_task_watcher_queue(bus: InMemoryBus) -> None:
    watcher = events_queue("w", TASK)
    bus.declare(Topology(queues=(watcher,)))
    bus.publish(EVENTS_EXCHANGE, event_key("heartbeat", TASK, "site-a"), b"", kind="Heartbeat")
    bus.publish(EVENTS_EXCHANGE, event_key("eval", TASK), b"", kind="EvalReport")
    bus.publish(EVENTS_EXCHANGE, event_key("eval", "other"), b"", kind="EvalReport")
    assert bus.queue_depth(watcher.name) == 2


def test_a_closed_bus_refuses_new_work() -> None:
    bus = InMemoryBus(topology=task_topology(TASK))
    bus.close()
    with pytest.raises(ConnectionLost):
        bus.publish(UPDATES_EXCHANGE, update_key(TASK, "a"), b"", kind="X")
