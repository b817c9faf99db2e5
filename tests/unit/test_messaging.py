"""The one place that labels envelopes: what `publish_message` sends, `decode_delivery` takes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from schemas import (
    CONTENT_TYPE,
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    DecodeError,
    DecodeReason,
    Heartbeat,
    JoinAccepted,
    JoinRequest,
    Rejection,
    TrainerLeft,
    encode,
)
from services.common.bus import Delivery, InMemoryBus, PreconditionFailed
from services.common.messaging import (
    call_message,
    decode_delivery,
    envelope_headers,
    publish_message,
)
from services.common.topology import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    BindingSpec,
    QueueSpec,
    Topology,
    control_queue,
    join_key,
    shared_topology,
    task_topology,
)

TAP = "test.tap"


def _bus() -> InMemoryBus:
    tap = QueueSpec(name=TAP, durable=False, bindings=(BindingSpec(EVENTS_EXCHANGE, "#"),))
    return InMemoryBus(topology=shared_topology().merge(Topology(queues=(tap,))))


def _left() -> TrainerLeft:
    return TrainerLeft(task_id="pneumonia", trainer_id="site-a", updates_sent=3)


def _taken(bus: InMemoryBus) -> Delivery:
    delivery = bus.get(TAP)
    assert delivery is not None
    bus.ack(delivery)
    return delivery


def test_publish_message_labels_the_envelope_and_returns_its_message_id() -> None:
    bus = _bus()
    left = _left()

    message_id = publish_message(bus, EVENTS_EXCHANGE, "trainer.left.pneumonia.site-a", left)

    delivery = _taken(bus)
    assert delivery.body == encode(left)
    assert delivery.routing_key == "trainer.left.pneumonia.site-a"
    assert delivery.properties.kind == "trainer_left"
    assert delivery.properties.content_type == CONTENT_TYPE
    assert delivery.properties.headers == {SCHEMA_HEADER: SCHEMA_VERSION}
    assert delivery.properties.message_id == message_id
    assert len(message_id) == 32 and int(message_id, 16) >= 0
    assert delivery.properties.persistent is True


def test_each_published_message_gets_its_own_message_id() -> None:
    bus = _bus()
    ids = {publish_message(bus, EVENTS_EXCHANGE, "x", _left()) for _ in range(3)}
    assert len(ids) == 3


def test_publish_message_passes_user_id_reply_to_and_persistence_through() -> None:
    bus = _bus()

    publish_message(
        bus, EVENTS_EXCHANGE, "heartbeat.pneumonia.site-a",
        Heartbeat(task_id="pneumonia", sender_id="site-a", role="trainer"),
        user_id="guest", reply_to="somewhere", correlation_id="c-1", persistent=False,
    )  # fmt: skip

    properties = _taken(bus).properties
    assert properties.user_id == "guest"
    assert properties.reply_to == "somewhere"
    assert properties.correlation_id == "c-1"
    assert properties.persistent is False


def test_a_user_id_that_is_not_the_login_is_refused_by_the_broker() -> None:
    bus = _bus()
    with pytest.raises(PreconditionFailed):
        publish_message(bus, EVENTS_EXCHANGE, "x", _left(), user_id="someone-else")


def test_decode_delivery_returns_the_message_that_was_published() -> None:
    bus = _bus()
    left = _left()
    publish_message(bus, EVENTS_EXCHANGE, "x", left)

    assert decode_delivery(_taken(bus), (TrainerLeft,)) == left


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"content_type": "application/json"}, DecodeReason.CONTENT_TYPE),
        ({"headers": {}}, DecodeReason.SCHEMA_VERSION),
        ({"headers": {SCHEMA_HEADER: SCHEMA_VERSION + 1}}, DecodeReason.SCHEMA_VERSION),
    ],
)
def test_decode_delivery_refuses_a_foreign_envelope(
    change: dict[str, Any], reason: DecodeReason
) -> None:
    bus = _bus()
    publish_message(bus, EVENTS_EXCHANGE, "x", _left())
    good = _taken(bus)
    bad = dataclasses.replace(good, properties=dataclasses.replace(good.properties, **change))

    with pytest.raises(DecodeError) as raised:
        decode_delivery(bad, (TrainerLeft,))

    assert raised.value.reason is reason


def test_decode_delivery_refuses_a_kind_outside_the_accept_list() -> None:
    bus = _bus()
    publish_message(bus, EVENTS_EXCHANGE, "x", _left())

    with pytest.raises(DecodeError) as raised:
        decode_delivery(_taken(bus), (Heartbeat, Rejection))

    assert raised.value.reason is DecodeReason.WRONG_KIND


def test_call_message_sends_a_labelled_request_and_decodes_the_reply() -> None:
    # Given a responder on the control queue that checks the request's envelope
    bus = InMemoryBus(topology=task_topology("pneumonia"))
    seen: list[JoinRequest] = []

    def answer(delivery: Delivery) -> None:
        seen.append(decode_delivery(delivery, (JoinRequest,)))
        reply = Rejection(reason="unknown-task", detail="no such task")
        bus.reply(delivery, encode(reply), kind=reply.kind, headers=envelope_headers())
        bus.ack(delivery)

    bus.consume(control_queue("pneumonia"), answer)
    request = JoinRequest(task_id="pneumonia", trainer_id="site-a", num_examples=5)

    # When a participant calls
    reply = call_message(
        bus, CONTROL_EXCHANGE, join_key("pneumonia"), request,
        accept=(JoinAccepted, Rejection), timeout=5.0,
    )  # fmt: skip

    # Then the responder decoded the request and the caller the reply
    assert seen == [request]
    assert isinstance(reply, Rejection) and reply.reason == "unknown-task"


def test_envelope_headers_are_a_fresh_dict_each_time() -> None:
    first = envelope_headers()
    first["x"] = 1
    assert envelope_headers() == {SCHEMA_HEADER: SCHEMA_VERSION}
