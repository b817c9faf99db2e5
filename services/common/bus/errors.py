"""The transport's own error hierarchy: services catch these, never pika's exceptions."""

from __future__ import annotations


class TransportError(Exception):
    """Base class of every error raised by a bus."""


class ConnectionLost(TransportError):
    """The broker could not be reached, or the connection dropped, within the allowed time."""


class PublishRefused(TransportError):
    """The broker refused a message (a negative confirm, e.g. a full `reject-publish` queue)."""


class Unroutable(TransportError):
    """A mandatory message matched no queue and came back from the broker."""


class RpcTimeout(TransportError):
    """No reply to a request arrived within its timeout."""


class AccessRefused(TransportError):
    """The broker refused the login or the operation for this user (AMQP 403 / 530)."""


class TlsError(TransportError):
    """The TLS handshake with the broker failed, typically certificate verification."""


class NotFound(TransportError):
    """The exchange or queue named by an operation does not exist (AMQP 404)."""


class PreconditionFailed(TransportError):
    """The broker refused an operation whose preconditions do not hold (AMQP 406).

    Typical causes: re-declaring a queue with different arguments, or a `user_id`
    property that does not match the login.
    """


class AlreadySettled(TransportError):
    """A delivery was acknowledged, rejected or dead-lettered a second time."""
