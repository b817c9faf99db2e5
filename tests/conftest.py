"""Broker fixtures for every suite: where RabbitMQ is, whether it runs, unique names per test.

A test that needs the broker and finds none fails when `CI` is set and skips otherwise.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from itertools import count
from typing import Final

import pika
import pika.exceptions
import pytest

from tests.support.private_broker import PrivateBroker, rabbitmq_installed, running_private_broker

AMQP_URL_ENV: Final = "FEDMQ_TEST_AMQP_URL"
DEFAULT_TEST_AMQP_URL: Final = "amqp://guest:guest@127.0.0.1:5672/%2F"
BROKER_PROBE_TIMEOUT_S: Final = 5.0


def broker_url() -> str:
    """The broker tests talk to: `$FEDMQ_TEST_AMQP_URL`, else the local guest account."""
    return os.environ.get(AMQP_URL_ENV, DEFAULT_TEST_AMQP_URL)


def broker_available(url: str | None = None) -> bool:
    """Whether an AMQP connection to `url` opens right now."""
    params = pika.URLParameters(url or broker_url())
    params.connection_attempts = 1
    params.socket_timeout = BROKER_PROBE_TIMEOUT_S
    params.stack_timeout = BROKER_PROBE_TIMEOUT_S
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError):
        return False
    connection.close()
    return True


def require_broker(url: str | None = None) -> str:
    """Return the broker URL, or fail (with `CI` set) / skip the test when none answers."""
    url = url or broker_url()
    if not broker_available(url):
        message = (
            f"RabbitMQ does not answer at {url.split('@')[-1]}: start it with "
            "`rabbitmq-server -detached` (or set FEDMQ_TEST_AMQP_URL)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def amqp_url() -> str:
    """URL of a running broker (see `require_broker`)."""
    return require_broker()


class BrokerNames:
    """Names no other test (or left-over run) uses, and cleanup of the queues they name."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:10]
        self._serial = count(1)
        self._queues: list[str] = []
        self._exchanges: list[str] = []

    def id(self, label: str = "id") -> str:
        """A valid task/trainer id, unique to this test."""
        return f"{label}-{self.token}-{next(self._serial)}"

    def task_id(self, label: str = "task") -> str:
        """A unique task id whose updates and control queues are deleted after the test."""
        task_id = self.id(label)
        self.track_queue(f"fedmq.{task_id}.updates")
        self.track_queue(f"fedmq.{task_id}.control")
        return task_id

    def queue(self, label: str = "queue") -> str:
        """A unique queue name, deleted after the test."""
        name = f"test.{label}.{self.token}.{next(self._serial)}"
        self.track_queue(name)
        return name

    def exchange(self, label: str = "exchange") -> str:
        """A unique exchange name, deleted after the test."""
        name = f"test.{label}.{self.token}.{next(self._serial)}"
        self._exchanges.append(name)
        return name

    def track_queue(self, name: str) -> str:
        """Delete `name` after the test."""
        self._queues.append(name)
        return name

    def cleanup(self, url: str) -> None:
        """Delete every tracked queue and exchange (absent ones are fine)."""
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            for queue in self._queues:
                channel.queue_delete(queue)
            for exchange in self._exchanges:
                channel.exchange_delete(exchange)
        finally:
            connection.close()


@pytest.fixture
def broker_names(amqp_url: str) -> Iterator[BrokerNames]:
    """Unique names for this test; what they name is deleted afterwards."""
    names = BrokerNames()
    yield names
    if broker_available(amqp_url):
        names.cleanup(amqp_url)


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    """A RabbitMQ node of this test's own (free to stop, restart or reconfigure), removed after."""
    if not rabbitmq_installed():
        message = "rabbitmq-server is not installed: a private broker node cannot be started"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with running_private_broker() as broker:
        yield broker
