"""`fedmq topology` shows routing keys and what is ready and unacknowledged in each queue."""

from __future__ import annotations

import time

import pytest

from services.cli import main
from services.common.bus.pika_bus import PikaBus
from services.common.topology import (
    UPDATES_EXCHANGE,
    control_queue,
    task_topology,
    update_key,
    updates_queue,
)
from tests.conftest import BrokerNames

pytestmark = pytest.mark.broker

MANAGEMENT_STATS_S = 6.0
"""The management API refreshes queue counts every 5 s."""


def test_topology_shows_routing_keys_and_ready_and_unacked_counts(
    amqp_url: str,
    broker_names: BrokerNames,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a task's updates queue with one message held unacknowledged and one ready
    task = broker_names.id("topo")
    monkeypatch.setenv("FEDMQ_AMQP_URL", amqp_url)
    monkeypatch.setenv("COLUMNS", "250")
    with PikaBus(amqp_url) as bus:
        bus.declare(task_topology(task))
        for body in (b"a", b"b"):
            bus.publish(UPDATES_EXCHANGE, update_key(task, "s"), body, kind="ModelUpdate")
        held = bus.get(updates_queue(task))
        assert held is not None
        time.sleep(MANAGEMENT_STATS_S)
        try:
            # When the operator looks at the topology
            assert main(["topology", "--task-id", task]) == 0
        finally:
            bus.delete_queue(updates_queue(task))
            bus.delete_queue(control_queue(task))
    out = capsys.readouterr().out
    # Then the row of the updates queue shows 1 ready, 1 unacked and its routing key
    (row,) = [line for line in out.splitlines() if updates_queue(task) in line]
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[1:3] == ["1", "1"]
    assert f"[update.{task}.*]" in out
