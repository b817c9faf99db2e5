"""A private broker loaded with the shipped definitions, its logins, and a hostile site's tools.

The node imports `infra/rabbitmq/definitions.json` at boot (vhost `fedmq`, task
`pneumonia`, one login per service and per site, least-privilege permissions), exactly as
the compose stack does, so every permission a test relies on is the shipped one.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pika
import pika.exceptions

from services.common.topology import (
    DEAD_QUEUE,
    DETAIL_HEADER,
    ORIGINAL_USER_ID_HEADER,
    REASON_HEADER,
)
from tests.support.private_broker import PrivateBroker, running_private_broker

REPO: Final = Path(__file__).resolve().parents[2]
DEFINITIONS: Final = REPO / "infra" / "rabbitmq" / "definitions.json"
SECRETS: Final = REPO / "infra" / "secrets" / "dev"
VHOST: Final = "fedmq"
TASK: Final = "pneumonia"
"""The task the shipped definitions provision."""
ADMIN: Final = "fedmq-admin"


def password(user: str) -> str:
    """The dev password of a login of the shipped definitions."""
    for path in (SECRETS / user, SECRETS / "trainers" / user):
        if path.is_file():
            return path.read_text().strip()
    raise KeyError(f"no dev password for {user!r}")


@dataclass(frozen=True)
class Node:
    """The private node and how to reach it as each login."""

    broker: PrivateBroker

    def url(self, user: str) -> str:
        """AMQP URL of `user` on the node's `fedmq` vhost."""
        return f"amqp://{user}:{password(user)}@127.0.0.1:{self.broker.amqp_port}/{VHOST}"


@contextmanager
def definitions_broker() -> Iterator[Node]:
    """A started private node that imported the shipped definitions at boot."""
    directory = Path(tempfile.mkdtemp(prefix="fedmq-broker-", dir="/tmp"))
    shutil.copy(DEFINITIONS, directory / "definitions.json")
    lines = [f"load_definitions = {directory / 'definitions.json'}"]
    with running_private_broker(lines, directory=directory) as broker:
        yield Node(broker)


@dataclass(frozen=True)
class DeadLetter:
    """One message of `fedmq.dead` with fedmq's headers."""

    message_id: str | None
    reason: str
    detail: str
    sender: str | None
    """`x-fedmq-original-user-id`: the broker-verified login of the original sender."""
    routing_key: str
    size: int


class DeadLetterReader:
    """Reads `fedmq.dead` as the operator login, keeping every letter seen so far."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.seen: list[DeadLetter] = []

    def read(self) -> list[DeadLetter]:
        """Take what arrived since the last call; return every letter seen."""
        connection = pika.BlockingConnection(pika.URLParameters(self._url))
        try:
            channel = connection.channel()
            while True:
                method, properties, body = channel.basic_get(DEAD_QUEUE, auto_ack=True)
                if method is None:
                    break
                headers = properties.headers or {}
                self.seen.append(
                    DeadLetter(
                        message_id=properties.message_id,
                        reason=_text(headers.get(REASON_HEADER)),
                        detail=_text(headers.get(DETAIL_HEADER)),
                        sender=_text(headers.get(ORIGINAL_USER_ID_HEADER)) or None,
                        routing_key=method.routing_key,
                        size=len(body),
                    )
                )
        finally:
            connection.close()
        return self.seen

    def of(self, message_id: str) -> DeadLetter | None:
        """The letter of `message_id`, reading the queue again."""
        return next((d for d in self.read() if d.message_id == message_id), None)


def _text(value: object) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def publish_as(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    kind: str,
    user_id: str | None = None,
    reply_to: str | None = None,
    headers: dict[str, Any] | None = None,
    content_type: str = "application/x-msgpack",
) -> str:
    """Publish one message with bare pika and confirms; returns its message id.

    Raises `pika.exceptions.ChannelClosedByBroker` when the broker refuses it (403).
    """
    message_id = uuid.uuid4().hex
    properties = pika.BasicProperties(
        content_type=content_type,
        type=kind,
        message_id=message_id,
        user_id=user_id,
        reply_to=reply_to,
        headers={"fedmq-schema": 1, **(headers or {})},
        delivery_mode=2,
    )
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, body, properties)
    finally:
        if connection.is_open:
            connection.close()
    return message_id


def refused_code(url: str, exchange: str, routing_key: str, **options: Any) -> int | None:
    """The AMQP reply code with which the broker refused a publish (None: it was accepted)."""
    try:
        publish_as(url, exchange, routing_key, b"\x80", kind=options.pop("kind", "x"), **options)
    except pika.exceptions.ChannelClosedByBroker as error:
        return int(error.reply_code)
    return None
