"""fedmq messages on a bus: the one place that labels an envelope and reads one back.

Every message travels as `schemas.encode(msg)` with AMQP `type=<kind>`, a fresh
`message_id`, and the schema header; every consumer checks that envelope before decoding.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from schemas import (
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    DecodeLimits,
    Message,
    check_envelope,
    decode,
    encode,
    new_id,
)
from schemas.codec import DEFAULT_LIMITS
from services.common.bus import Bus, Delivery

M = TypeVar("M", bound=BaseModel)


def envelope_headers() -> dict[str, object]:
    """The AMQP headers every fedmq message carries (a fresh dict: the bus may keep it)."""
    return {SCHEMA_HEADER: SCHEMA_VERSION}


def publish_message(
    bus: Bus,
    exchange: str,
    routing_key: str,
    message: Message,
    *,
    user_id: str | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    mandatory: bool = False,
    persistent: bool = True,
) -> str:
    """Encode `message`, publish it with confirms and return its `message_id`.

    Transport errors (`PublishRefused`, `Unroutable`, `ConnectionLost`, ...) propagate:
    whether to retry is the caller's decision.
    """
    message_id = new_id()
    bus.publish(
        exchange,
        routing_key,
        encode(message),
        kind=message.kind,
        message_id=message_id,
        headers=envelope_headers(),
        user_id=user_id,
        reply_to=reply_to,
        correlation_id=correlation_id,
        mandatory=mandatory,
        persistent=persistent,
    )
    return message_id


def decode_delivery(
    delivery: Delivery, accept: tuple[type[M], ...], *, limits: DecodeLimits = DEFAULT_LIMITS
) -> M:
    """Check the envelope (content type, schema header), then decode one of `accept`.

    Raises `schemas.DecodeError` with a reason fit for `x-fedmq-reason`.
    """
    check_envelope(delivery.properties.content_type, delivery.properties.headers)
    return decode(delivery.body, accept=accept, limits=limits)


def call_message(
    bus: Bus,
    exchange: str,
    routing_key: str,
    request: Message,
    *,
    accept: tuple[type[M], ...],
    timeout: float,
    user_id: str | None = None,
) -> M:
    """RPC: send `request`, wait for the reply, decode it as one of `accept`.

    Raises `RpcTimeout` (or another `TransportError`) and `schemas.DecodeError`.
    """
    reply = bus.call(
        exchange,
        routing_key,
        encode(request),
        kind=request.kind,
        headers=envelope_headers(),
        user_id=user_id,
        timeout=timeout,
    )
    return decode_delivery(reply, accept)
