"""Broker permissions surface as `AccessRefused`, never as a pika exception or a hang."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from services.common.bus import AccessRefused
from services.common.bus.pika_bus import PikaBus
from services.common.topology import (
    EVENTS_EXCHANGE,
    UPDATES_EXCHANGE,
    event_key,
    shared_topology,
    update_key,
)
from tests.conftest import BrokerNames
from tests.integration.conftest import FAST_RECONNECT, BrokerUser

pytestmark = pytest.mark.broker


def test_publishing_to_an_exchange_the_user_cannot_write_is_access_refused(
    bus: PikaBus, broker_names: BrokerNames, make_broker_user: Callable[..., BrokerUser]
) -> None:
    # Given a user that may write to fedmq.events only
    bus.declare(shared_topology())
    user = make_broker_user(write=r"^fedmq\.events$")
    task = broker_names.id("task")
    with PikaBus(user.url, reconnect=FAST_RECONNECT) as limited:
        # When it publishes an update
        with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
            limited.publish(UPDATES_EXCHANGE, update_key(task, "a"), b"u", kind="ModelUpdate")
        # Then the refusal is typed, and what it may do still works on the same bus
        limited.publish(EVENTS_EXCHANGE, event_key("eval", task), b"e", kind="EvalReport")
        assert limited.connects == 1


def test_a_wrong_password_is_access_refused_at_once(
    make_broker_user: Callable[..., BrokerUser],
) -> None:
    # Given an existing user and the wrong password
    user = make_broker_user()
    wrong = user.url.replace(user.password, "not-the-password")
    started = time.monotonic()
    # When a bus connects, it fails with AccessRefused instead of retrying until the timeout
    with pytest.raises(AccessRefused, match="refused the login"):
        PikaBus(wrong, reconnect=FAST_RECONNECT, connect_timeout=30)
    assert time.monotonic() - started < 10
