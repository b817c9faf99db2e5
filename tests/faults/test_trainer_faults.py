"""Trainers that crash, hang, send twice or come back under the same name."""

from __future__ import annotations

import json

import pytest

from tests.support.fault_kit import (
    EventTap,
    FaultFederation,
    confirmed_update_ids,
    drain_dead_letters,
    finite,
    metrics_port,
    resume,
    scrape,
    suspend,
    wait_serving,
)
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.e2e]

TRAINER_TIMEOUT_S = 4.0


def _task_file(federation: FaultFederation) -> str:
    path = federation.run_dir / "task.json"
    spec = {"task_id": federation.task_id, "model": "cnn-small", "num_classes": 2,
            "local_steps": 2, "heartbeat_interval": 1.0}  # fmt: skip
    strategy = {"name": "fedasync", "alpha": 0.3, "staleness": "polynomial"}
    path.write_text(json.dumps({"spec": spec, "strategy": strategy}))
    return str(path)


def _events(tap: EventTap, kind: str, trainer: str, reason: str | None = None) -> int:
    return sum(
        1
        for event in tap.of(kind)
        if event["trainer_id"] == trainer and (reason is None or event["reason"] == reason)
    )


def test_crashed_hung_duplicating_and_returning_trainers_leave_registry_and_model_right(
    federation: FaultFederation,
) -> None:
    """SIGKILL and SIGSTOP end in `heartbeat-timeout` departures and a lower trainer gauge; a
    second copy of an update is dead-lettered as `duplicate`; a second join under the same
    name counts once; returning trainers are counted again and their updates applied once."""
    tap = EventTap(federation.amqp_url, federation.task_id)
    port = metrics_port()
    aggregator = federation.aggregator(
        "--task-file", _task_file(federation), "--metrics-port", str(port),
        FEDMQ_TRAINER_TIMEOUT=str(TRAINER_TIMEOUT_S),
    )  # fmt: skip

    def gauge() -> float:
        return scrape(port, "fedmq_connected_trainers").get("", -1.0)

    def start(i: int) -> ServiceProcess:
        return federation.trainer(f"site-{i}", site=i, sites=3, FEDMQ_SIMULATED_SLOWDOWN="4")

    trainers = [start(i) for i in range(3)]
    wait_serving(aggregator)
    try:
        wait_for(lambda: all(confirmed_update_ids(t) for t in trainers), timeout=180,
                 what="an update from every trainer")  # fmt: skip
        wait_for(lambda: gauge() == 3, timeout=30, what="3 trainers counted")
        with federation.bus() as bus, federation.bus() as bus2:
            # a trainer joining twice under one name (two connections) is counted once
            probe = FederationProbe(bus, federation.task_id, "twice", amqp_url=federation.amqp_url)
            model = probe.join().model
            FederationProbe(bus2, federation.task_id, "twice", amqp_url=federation.amqp_url).join()
            wait_for(lambda: _events(tap, "trainer.joined", "twice") >= 1, timeout=30,
                     what="the probe's join event")  # fmt: skip
            assert gauge() == 4
            # the same update sent twice is applied once
            update = probe.update(model, 1e-3)
            probe.publish(update)
            duplicate_id = probe.publish(update)
        # When one trainer is SIGKILLed mid-training and another hangs (SIGSTOP)
        trainers[0].kill()
        suspend(trainers[1])
        # Then both (and the silent probe) time out, and the gauge drops to the one left
        for name in ("site-0", "site-1", "twice"):
            wait_for(lambda n=name: _events(tap, "trainer.left", n, "heartbeat-timeout") == 1,
                     timeout=30, what=f"{name} timing out")  # fmt: skip
        wait_for(lambda: gauge() == 1, timeout=10, what="1 trainer counted")
        # When the hung one wakes up and the crashed one comes back under its name
        sent_by_1 = len(confirmed_update_ids(trainers[1]))
        resume(trainers[1])
        trainers[0] = start(0)
        # Then both are counted again and send updates that are applied
        wait_for(lambda: gauge() == 3, timeout=120, what="3 trainers counted again")
        wait_for(lambda: bool(confirmed_update_ids(trainers[0]))
                 and len(confirmed_update_ids(trainers[1])) > sent_by_1,
                 timeout=120, what="updates after the faults")  # fmt: skip
        for trainer in trainers:
            assert trainer.terminate() == 0, trainer.output()[-3000:]
        wait_for(lambda: _events(tap, "trainer.left", "site-2", "shutdown") == 1, timeout=30,
                 what="a clean leave")  # fmt: skip
        confirmed = {uid for t in trainers for uid in confirmed_update_ids(t)}
        confirmed |= {update.update_id}
        first_site0 = federation.processes[1]
        confirmed |= set(confirmed_update_ids(first_site0))

        def applied() -> set[str]:
            saved = federation.checkpoint()
            return set() if saved is None else set(saved.applied_ids)

        wait_for(lambda: confirmed <= applied(), timeout=120, what="every update applied")
        assert aggregator.terminate() == 0, aggregator.output()[-3000:]
    finally:
        tap.close()
    saved = federation.checkpoint()
    assert saved is not None and finite(saved.weights)
    assert saved.updates_applied == len(saved.applied_ids) == saved.version
    dead = [
        d for d in drain_dead_letters(federation.amqp_url) if federation.task_id in d.routing_key
    ]
    assert [(d.message_id, d.reason) for d in dead] == [(duplicate_id, "duplicate")]
    assert _events(tap, "trainer.joined", "twice") == 1
    assert _events(tap, "trainer.joined", "site-0") == 2
    assert _events(tap, "trainer.joined", "site-1") == 2
    print(f"\nFAULTS trainer_faults applied={saved.updates_applied} dead={len(dead)}")
