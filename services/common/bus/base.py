"""The transport interface every service talks to: publish, consume, settle, call.

Two implementations: `PikaBus` (RabbitMQ) and `InMemoryBus` (unit tests). Services receive
a `Bus` through their constructor and never import pika.
"""

from __future__ import annotations

import math
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

import structlog

from services.common.bus.errors import TransportError
from services.common.topology import (
    DETAIL_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    ORIGINAL_USER_ID_HEADER,
    REASON_HEADER,
    Topology,
)

log = structlog.get_logger(__name__)

CONTENT_TYPE: Final = "application/x-msgpack"
"""Every fedmq body is msgpack."""
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
"""RabbitMQ's pseudo-queue for RPC replies without a reply queue per caller."""
DIRECT_REPLY_PREFIX: Final = DIRECT_REPLY_TO + "."
"""What the broker turns `reply_to=amq.rabbitmq.reply-to` into: an address that routes only
to the channel that sent the request, so a reply can never land in someone else's queue."""
FEDMQ_HEADER_PREFIX: Final = "x-fedmq-"
"""Headers only fedmq itself writes (dead-letter reasons, the verified sender): a copy a
sender supplied is dropped, so nobody can make a dead letter blame another site."""
DEFAULT_PUBLISH_TIMEOUT_S: Final = 30.0
"""How long `publish` waits for a broker confirm, including a reconnect."""
DEFAULT_RPC_TIMEOUT_S: Final = 30.0
"""How long `call` waits for its reply."""
DEFAULT_SETTLE_TIMEOUT_S: Final = 30.0
"""How long `ack`/`reject`/`dead_letter` wait for the connection thread to run them."""
DEFAULT_PREFETCH: Final = 8
"""Unacknowledged deliveries a consumer may hold; the aggregator needs >= its buffer size."""
MAX_DETAIL_CHARS: Final = 1024
"""A dead letter's `x-fedmq-detail` is cut to this length: it is for humans, not a log dump."""
HANDLER_ERROR_REASON: Final = "handler-error"
"""Dead-letter reason used when a handler raised without settling its delivery."""

_HEADER_SCALARS: Final = (str, bytes, bool, int, float, type(None))


@dataclass(frozen=True)
class MessageProperties:
    """AMQP basic properties of a message, in fedmq's vocabulary (`kind` is AMQP `type`)."""

    content_type: str | None = CONTENT_TYPE
    kind: str | None = None
    message_id: str | None = None
    user_id: str | None = None
    headers: Mapping[str, object] = field(default_factory=dict)
    reply_to: str | None = None
    correlation_id: str | None = None
    timestamp: int | None = None
    persistent: bool = True


@dataclass(frozen=True)
class Delivery:
    """A received message. `handle` is the bus's opaque token for settling it."""

    body: bytes
    properties: MessageProperties
    exchange: str
    routing_key: str
    redelivered: bool
    handle: object = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str | None:
        """The message kind (AMQP `type` property)."""
        return self.properties.kind

    @property
    def message_id(self) -> str | None:
        """The sender's message id."""
        return self.properties.message_id


Handler = Callable[[Delivery], None]
"""Called once per delivery on a worker thread; it must settle the delivery."""


class Bus(ABC):
    """Transport interface: confirmed publishing, manual-ack consuming, RPC, dead-lettering.

    Every method is thread-safe. Handlers run on a worker thread per consumer, in order.
    """

    @abstractmethod
    def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings; idempotent. Re-declared after reconnects."""

    @abstractmethod
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        kind: str,
        message_id: str | None = None,
        headers: Mapping[str, object] | None = None,
        user_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        mandatory: bool = False,
        persistent: bool = True,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT_S,
    ) -> str:
        """Publish and return the message id once the broker confirmed the message.

        Raises `PublishRefused` on a negative confirm, `Unroutable` when `mandatory` and
        no queue matched, `ConnectionLost` when not confirmed within `timeout`.
        """

    def reply(
        self,
        request: Delivery,
        body: bytes,
        *,
        kind: str,
        headers: Mapping[str, object] | None = None,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT_S,
    ) -> str:
        """Answer an RPC `request` (see `call`) on its direct reply-to address.

        A `reply_to` naming a queue is refused (ValueError): publishing there through the
        default exchange would let a requester aim replies at another participant's queue.
        """
        reply_to = request.properties.reply_to
        if not reply_to:
            raise ValueError(f"message {request.message_id!r} has no reply_to to answer")
        if not is_direct_reply_to(reply_to):
            raise ValueError(
                f"message {request.message_id!r} asks for a reply to {reply_to[:128]!r}, "
                f"which is not the broker's direct reply-to ({DIRECT_REPLY_PREFIX}...)"
            )
        return self.publish(
            "",
            reply_to,
            body,
            kind=kind,
            headers=headers,
            correlation_id=request.properties.correlation_id,
            persistent=False,
            timeout=timeout,
        )

    @abstractmethod
    def consume(self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH) -> str:
        """Start consuming `queue` with manual acks; return a consumer tag for `cancel`."""

    @abstractmethod
    def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer after its running handler; unsettled deliveries go back."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """Acknowledge: the broker forgets the message."""

    def ack_all(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge several deliveries (a bus may batch them into one round trip)."""
        for delivery in deliveries:
            self.ack(delivery)

    @abstractmethod
    def reject(self, delivery: Delivery) -> None:
        """Reject without requeue (the queue's own dead-letter exchange, if any, gets it)."""

    @abstractmethod
    def dead_letter(self, delivery: Delivery, *, reason: str, detail: str = "") -> None:
        """Publish a copy to `fedmq.dlx` with `x-fedmq-reason`, confirmed, then ack."""

    @abstractmethod
    def call(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        kind: str,
        headers: Mapping[str, object] | None = None,
        user_id: str | None = None,
        timeout: float = DEFAULT_RPC_TIMEOUT_S,
    ) -> Delivery:
        """Send a request over direct reply-to and return the reply; `RpcTimeout` if none.

        `user_id` (the login) lets the broker vouch for who asks.
        """

    @abstractmethod
    def get(self, queue: str) -> Delivery | None:
        """Take one message from `queue` (manual ack), or None if it is empty."""

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Drop the ready messages of `queue`; return how many there were."""

    @abstractmethod
    def delete_queue(self, queue: str) -> int:
        """Delete `queue` (no error if absent); return how many messages it held."""

    @abstractmethod
    def queue_depth(self, queue: str) -> int:
        """Ready (not unacknowledged) messages in `queue`; `NotFound` if it does not exist."""

    @abstractmethod
    def close(self) -> None:
        """Stop consumers after their running handler, then close the connection."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def is_direct_reply_to(address: str | None) -> bool:
    """Whether `address` is a direct reply-to address the broker issued (routes to its caller)."""
    return bool(address) and str(address).startswith(DIRECT_REPLY_PREFIX)


def verified_sender(delivery: Delivery) -> str | None:
    """The broker-checked login of the sender: `user_id` when present (RabbitMQ refuses a
    `user_id` that is not the publisher's login), else None."""
    return delivery.properties.user_id or None


def without_fedmq_headers(headers: Mapping[str, object]) -> dict[str, object]:
    """`headers` less every `x-fedmq-*` one (those are fedmq's to write, never a sender's)."""
    return {k: v for k, v in headers.items() if not k.lower().startswith(FEDMQ_HEADER_PREFIX)}


def new_message_id() -> str:
    """A fresh message id (uuid4, hex)."""
    return uuid.uuid4().hex


def check_headers(headers: Mapping[str, object] | None) -> dict[str, object]:
    """Copy `headers`, refusing values an AMQP field table cannot carry."""
    if headers is None:
        return {}
    for key, value in headers.items():
        if not isinstance(key, str):
            raise TypeError(f"header names must be str, got {key!r}")
        _check_header_value(key, value)
    return dict(headers)


def _check_header_value(key: str, value: object) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"header {key!r} must be finite, got {value!r}")
    if isinstance(value, _HEADER_SCALARS):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_header_value(key, item)
        return
    if isinstance(value, Mapping):
        check_headers(value)
        return
    raise TypeError(f"header {key!r} has a value of type {type(value).__name__} AMQP cannot carry")


def dead_letter_properties(delivery: Delivery, *, reason: str, detail: str) -> MessageProperties:
    """Properties of the dead-lettered copy: the original ones plus fedmq's reason headers.

    `user_id` moves into a header: the broker refuses a `user_id` that is not the login
    of whoever publishes the copy. Every `x-fedmq-*` header the sender put on the original
    is dropped first, so the reason and the sender recorded are fedmq's, never forged.
    """
    if not reason:
        raise ValueError("a dead letter needs a non-empty reason")
    original = delivery.properties
    headers = without_fedmq_headers(original.headers)
    headers[REASON_HEADER] = reason
    headers[DETAIL_HEADER] = detail[:MAX_DETAIL_CHARS]
    headers[ORIGINAL_EXCHANGE_HEADER] = delivery.exchange
    headers[ORIGINAL_ROUTING_KEY_HEADER] = delivery.routing_key
    if original.user_id is not None:
        headers[ORIGINAL_USER_ID_HEADER] = original.user_id
    return MessageProperties(
        content_type=original.content_type,
        kind=original.kind,
        message_id=original.message_id,
        user_id=None,
        headers=headers,
        reply_to=original.reply_to,
        correlation_id=original.correlation_id,
        timestamp=original.timestamp,
        persistent=True,
    )


def run_handler(
    bus: Bus, handler: Handler, delivery: Delivery, *, settled: Callable[[], bool]
) -> None:
    """Call `handler`; if it raises without settling, dead-letter the delivery with the error.

    Requeueing instead would loop forever on a poison message.
    """
    try:
        handler(delivery)
    except Exception as exc:  # the consumer must survive any handler bug
        log.exception("handler failed", message_id=delivery.message_id, kind=delivery.kind)
        if settled():
            return
        try:
            bus.dead_letter(
                delivery, reason=HANDLER_ERROR_REASON, detail=f"{type(exc).__name__}: {exc}"
            )
        except TransportError:
            log.exception("could not dead-letter after a handler error; the broker keeps it")
