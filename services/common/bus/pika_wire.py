"""Translations between pika's objects and the bus's own: message properties, channel errors."""

from __future__ import annotations

from typing import Any

import pika

from services.common.bus.base import MessageProperties
from services.common.bus.errors import (
    AccessRefused,
    NotFound,
    PreconditionFailed,
    TransportError,
)


def to_pika_properties(properties: MessageProperties) -> Any:
    """`MessageProperties` as pika's `BasicProperties` (persistent = delivery mode 2)."""
    return pika.BasicProperties(
        content_type=properties.content_type,
        type=properties.kind,
        message_id=properties.message_id,
        user_id=properties.user_id,
        headers=dict(properties.headers) or None,
        reply_to=properties.reply_to,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        delivery_mode=(
            pika.DeliveryMode.Persistent if properties.persistent else pika.DeliveryMode.Transient
        ),
    )


def from_pika_properties(properties: Any) -> MessageProperties:
    """pika's `BasicProperties` as `MessageProperties`."""
    return MessageProperties(
        content_type=properties.content_type,
        kind=properties.type,
        message_id=properties.message_id,
        user_id=properties.user_id,
        headers=dict(properties.headers or {}),
        reply_to=properties.reply_to,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        persistent=properties.delivery_mode == pika.DeliveryMode.Persistent.value,
    )


def channel_error(exc: Any, what: str) -> TransportError:
    """Translate a broker channel close (AMQP reply code) into our hierarchy."""
    code, text = int(exc.reply_code), str(exc.reply_text)
    if code == 403:
        return AccessRefused(f"{what}: {text}")
    if code == 404:
        return NotFound(f"{what}: {text}")
    if code == 406:
        return PreconditionFailed(f"{what}: {text}")
    return TransportError(f"{what}: the broker closed the channel ({code} {text})")
