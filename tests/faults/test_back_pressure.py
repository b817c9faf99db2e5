"""Updates arriving while the aggregator is down fill the queue, then publishers back off."""

from __future__ import annotations

import json

import pytest

from services.common.bus import PublishRefused
from tests.support.fault_kit import (
    FaultFederation,
    confirmed_update_ids,
    finite,
    logged,
    wait_serving,
)
from tests.support.probe import FederationProbe
from tests.support.processes import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.e2e]

UPDATES_PER_TRAINER = 8
QUEUE_BYTES = 9_000_000
"""About five cnn-small updates (1.7 MB each): sixteen cannot fit while nobody consumes."""


def _task_file(federation: FaultFederation) -> str:
    path = federation.run_dir / "task.json"
    spec = {"task_id": federation.task_id, "model": "cnn-small", "num_classes": 2,
            "local_steps": 2}  # fmt: skip
    task = {"spec": spec, "strategy": {"name": "fedasync", "alpha": 0.3},
            "max_update_bytes": QUEUE_BYTES}  # fmt: skip
    path.write_text(json.dumps(task))
    return str(path)


def test_a_full_updates_queue_refuses_publishers_who_back_off_and_lose_nothing(
    federation: FaultFederation,
) -> None:
    """With the aggregator down the queue fills to its byte limit; the broker refuses further
    updates (`PublishRefused`), trainers retry them with back-off, and once an aggregator is
    back every confirmed update is applied exactly once."""
    task_file = _task_file(federation)
    aggregator = federation.aggregator("--task-file", task_file)
    trainers = [
        federation.trainer(f"site-{i}", site=i, sites=2, max_updates=UPDATES_PER_TRAINER)
        for i in range(2)
    ]
    wait_serving(aggregator)
    with federation.bus() as bus:
        probe = FederationProbe(bus, federation.task_id, "probe", amqp_url=federation.amqp_url)
        model = probe.join().model
        wait_for(lambda: all(confirmed_update_ids(t) for t in trainers), timeout=180,
                 what="every trainer joined and sending")  # fmt: skip
        # Given the aggregator is down while the trainers go on
        assert aggregator.terminate() == 0, aggregator.output()[-3000:]
        # When updates keep coming, the queue fills and the broker refuses the next ones
        probe_ids: list[str] = []
        with pytest.raises(PublishRefused):
            for _ in range(20):
                update = probe.update(model, 0.0)
                probe.publish(update)
                probe_ids.append(update.update_id)
        wait_for(lambda: sum(logged(t, "update refused (back-pressure); retrying it")
                             for t in trainers) >= 2,
                 timeout=120, what="trainers refused and backing off")  # fmt: skip
    # Then an aggregator back on duty drains the queue and every trainer finishes its updates
    aggregator = federation.aggregator("--task-file", task_file)
    wait_serving(aggregator)
    for trainer in trainers:
        assert trainer.popen.wait(timeout=240) == 0, trainer.output()[-3000:]
    confirmed = {uid for t in trainers for uid in confirmed_update_ids(t)} | set(probe_ids)

    def applied() -> set[str]:
        saved = federation.checkpoint()
        return set() if saved is None else set(saved.applied_ids)

    wait_for(lambda: confirmed <= applied(), timeout=120, what="every confirmed update applied")
    assert aggregator.terminate() == 0, aggregator.output()[-3000:]
    saved = federation.checkpoint()
    assert saved is not None and finite(saved.weights)
    assert len(confirmed) == 2 * UPDATES_PER_TRAINER + len(probe_ids)
    assert saved.updates_applied == len(saved.applied_ids) == saved.version == len(confirmed)
    refusals = sum(logged(t, "update refused (back-pressure); retrying it") for t in trainers)
    print(f"\nFAULTS back_pressure refusals={refusals} applied={saved.updates_applied}")
