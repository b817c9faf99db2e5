"""Broker node lists in the settings: FEDMQ_AMQP_URLS, the flag, and the single-URL default."""

from __future__ import annotations

import pytest

from services.cli import build_parser
from services.common.settings import DEFAULT_AMQP_URL, ServiceSettings
from services.trainer.cli import settings_from_args

NODES = [f"amqp://u:p@127.0.0.1:{port}/fedmq" for port in (5701, 5702, 5703)]


def test_without_a_node_list_the_bus_uses_the_single_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given only FEDMQ_AMQP_URL
    monkeypatch.delenv("FEDMQ_AMQP_URLS", raising=False)
    monkeypatch.setenv("FEDMQ_AMQP_URL", NODES[0])
    # When / Then
    assert ServiceSettings().broker_urls == [NODES[0]]
    monkeypatch.delenv("FEDMQ_AMQP_URL")
    assert ServiceSettings().broker_urls == [DEFAULT_AMQP_URL]


def test_a_comma_separated_node_list_replaces_the_single_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given three cluster nodes in the environment, spaces and a trailing comma included
    monkeypatch.setenv("FEDMQ_AMQP_URL", "amqp://ignored@127.0.0.1:1/%2F")
    monkeypatch.setenv("FEDMQ_AMQP_URLS", f"{NODES[0]}, {NODES[1]},{NODES[2]},")
    # When
    settings = ServiceSettings()
    # Then every node is tried, in the order given
    assert settings.broker_urls == NODES


def test_the_node_list_flag_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a node list in the environment and another on the command line
    monkeypatch.setenv("FEDMQ_AMQP_URLS", NODES[0])
    argv = ["trainer", "--trainer-id", "s1", "--amqp-urls", ",".join(NODES[1:])]
    # When
    settings = settings_from_args(build_parser().parse_args(argv))
    # Then
    assert settings.broker_urls == NODES[1:]


def test_followers_declare_classic_queues_unless_told_quorum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDMQ_FOLLOWER_QUEUE_TYPE", raising=False)
    assert ServiceSettings().follower_queue_type == "classic"
    monkeypatch.setenv("FEDMQ_FOLLOWER_QUEUE_TYPE", "quorum")
    assert ServiceSettings().follower_queue_type == "quorum"
