"""The transport layer: a small `Bus` interface, RabbitMQ and in-memory implementations."""

from services.common.bus.base import (
    CONTENT_TYPE,
    DIRECT_REPLY_TO,
    Bus,
    Delivery,
    Handler,
    MessageProperties,
    is_direct_reply_to,
    verified_sender,
)
from services.common.bus.errors import (
    AccessRefused,
    AlreadySettled,
    ConnectionLost,
    NotFound,
    PreconditionFailed,
    PublishRefused,
    RpcTimeout,
    TlsError,
    TransportError,
    Unroutable,
)
from services.common.bus.memory import InMemoryBus
from services.common.bus.pika_bus import PikaBus
from services.common.bus.pika_connect import ReconnectPolicy

__all__ = [
    "CONTENT_TYPE",
    "DIRECT_REPLY_TO",
    "AccessRefused",
    "AlreadySettled",
    "Bus",
    "ConnectionLost",
    "Delivery",
    "Handler",
    "InMemoryBus",
    "MessageProperties",
    "NotFound",
    "PikaBus",
    "PreconditionFailed",
    "PublishRefused",
    "ReconnectPolicy",
    "RpcTimeout",
    "TlsError",
    "TransportError",
    "Unroutable",
    "is_direct_reply_to",
    "verified_sender",
]
