"""Fixtures for tests against the real broker: a connected bus, raw reads, broker control."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

from services.common.bus.pika_bus import PikaBus
from services.common.bus.pika_connect import ReconnectPolicy
from tests.conftest import BrokerNames
from tests.support.tls_broker import TlsBroker, require_rabbitmq_installed, running_tls_broker

FAST_RECONNECT: Final = ReconnectPolicy(initial_delay_s=0.2, max_delay_s=1.0, max_attempts=120)
"""Tests restart the broker and should not wait out production back-off delays."""
RABBITMQCTL_TIMEOUT_S: Final = 120
BROKER_START_TIMEOUT_S: Final = 120


@pytest.fixture
def bus(amqp_url: str, broker_names: BrokerNames) -> Iterator[PikaBus]:
    """A connected PikaBus with a quick reconnect policy, closed before names are cleaned up."""
    with PikaBus(amqp_url, reconnect=FAST_RECONNECT, connection_name="fedmq-tests") as connected:
        yield connected


def wait_for(condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "") -> None:
    """Poll `condition` until true; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.05)


@dataclass(frozen=True)
class RawMessage:
    """A message read with plain pika, independent of the code under test."""

    properties: Any
    body: bytes
    exchange: str
    routing_key: str


def take_message(
    url: str, queue: str, message_id: str, *, timeout: float = 10.0
) -> RawMessage | None:
    """basic_get from `queue` until the message with `message_id` shows up; ack only that one.

    Other messages stay unacked until the channel closes, so they go back for their owners
    (`fedmq.dead` is shared by every test and every run).
    """
    connection = pika.BlockingConnection(pika.URLParameters(url))
    deadline = time.monotonic() + timeout
    try:
        channel = connection.channel()
        while time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                channel.close()  # requeue what we skipped, then look again
                channel = connection.channel()
                connection.sleep(0.1)
                continue
            if properties.message_id == message_id:
                channel.basic_ack(method.delivery_tag)
                return RawMessage(properties, body, method.exchange, method.routing_key)
        return None
    finally:
        connection.close()


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl` and return its output; fail the test if it is missing or fails."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not on PATH; this test controls the local broker")
    result = subprocess.run(
        ["rabbitmqctl", *args],
        capture_output=True,
        text=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {result.stderr or result.stdout}")
    return result.stdout


@contextlib.contextmanager
def broker_stopped() -> Iterator[None]:
    """Stop the broker application; whatever happens, start it again and wait for it."""
    rabbitmqctl("stop_app")
    try:
        yield
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup", "--timeout", str(BROKER_START_TIMEOUT_S))


@dataclass(frozen=True)
class BrokerUser:
    """A temporary broker account."""

    name: str
    password: str
    url: str


@pytest.fixture
def make_broker_user(amqp_url: str) -> Iterator[Callable[..., BrokerUser]]:
    """Create broker users with given permissions (regexes); all deleted after the test."""
    created: list[str] = []

    def make(*, configure: str = "^$", write: str = "^$", read: str = "^$") -> BrokerUser:
        name = f"fedmq-test-{secrets.token_hex(5)}"
        password = secrets.token_hex(12)
        rabbitmqctl("add_user", name, password)
        created.append(name)
        rabbitmqctl("set_permissions", "-p", "/", name, configure, write, read)
        parts = urlsplit(amqp_url)
        netloc = f"{name}:{password}@{parts.hostname}:{parts.port or 5672}"
        return BrokerUser(name, password, urlunsplit(parts._replace(netloc=netloc)))

    yield make
    for name in created:
        rabbitmqctl("delete_user", name)


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TlsBroker]:
    """A private node with a TLS listener that verifies client certificates when presented.

    Shared by the tests of one module (a node takes seconds to start), stopped after them.
    """
    require_rabbitmq_installed()
    with running_tls_broker(require_client_cert=False) as broker:
        yield broker


@pytest.fixture(scope="module")
def mutual_tls_broker() -> Iterator[TlsBroker]:
    """A private node whose TLS listener refuses clients without a certificate from its CA."""
    require_rabbitmq_installed()
    with running_tls_broker(require_client_cert=True) as broker:
        yield broker
