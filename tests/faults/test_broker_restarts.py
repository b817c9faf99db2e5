"""Restart the broker under a running federation: stop_app/start_app, then a full node restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.fault_kit import (
    FaultFederation,
    confirmed_update_ids,
    finite,
    logged,
    resume,
    suspend,
    wait_serving,
)
from tests.support.private_broker import PrivateBroker
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.e2e]

FLAGS = ("--model", "cnn-small", "--strategy", "fedasync", "--alpha", "0.3",
         "--staleness", "polynomial", "--local-steps", "2")  # fmt: skip
QUEUED = 5
"""Updates confirmed into the durable queue while the aggregator is paused, each restart."""


def _applied(federation: FaultFederation) -> set[str]:
    saved = federation.checkpoint()
    return set() if saved is None else set(saved.applied_ids)


def _logged_versions(path: Path) -> list[int]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [line["version"] for line in lines if line["split"] == "val"]


def _sent(trainers: list[ServiceProcess]) -> int:
    return sum(len(confirmed_update_ids(t)) for t in trainers)


def test_a_federation_rides_out_a_broker_app_restart_and_a_full_node_restart(
    restartable: tuple[FaultFederation, PrivateBroker],
) -> None:
    """Every service reconnects by itself and goes on; updates confirmed into the durable
    queue before each restart are applied after it; nothing confirmed is lost."""
    federation, broker = restartable
    eval_log = federation.run_dir / "eval.jsonl"
    aggregator = federation.aggregator(*FLAGS)
    trainers = [
        federation.trainer(f"site-{i}", site=i, sites=2, FEDMQ_SIMULATED_SLOWDOWN="4")
        for i in range(2)
    ]
    evaluator = federation.evaluator(eval_log)
    wait_serving(aggregator)
    probe_ids: list[str] = []
    with federation.bus() as bus:
        probe = FederationProbe(bus, federation.task_id, "probe", amqp_url=federation.amqp_url)
        start = probe.join().model
        for restart in (broker_app_restart, broker_node_restart):
            # Given progress, and updates confirmed into the queue of a paused aggregator
            wait_for(lambda: _sent(trainers) >= 2 and len(_applied(federation)) >= 2,
                     timeout=180, what="trainers' updates applied")  # fmt: skip
            wait_for(lambda: bool(_logged_versions(eval_log)), timeout=120, what="an evaluation")
            suspend(aggregator)
            batch = [probe.update(start, 0.0, base_version=0) for _ in range(QUEUED)]
            for update in batch:
                probe.publish(update)
            probe_ids += [u.update_id for u in batch]
            sent, evaluated = _sent(trainers), max(_logged_versions(eval_log))
            # When the broker goes away and comes back
            restart(broker)
            resume(aggregator)
            # Then the queued updates are applied and every service carries on
            wait_for(lambda ids=set(probe_ids): ids <= _applied(federation), timeout=180,
                     what="the updates queued before the restart")  # fmt: skip
            wait_for(lambda s=sent: _sent(trainers) >= s + 2, timeout=180, what="trainers sending")
            wait_for(lambda e=evaluated: max(_logged_versions(eval_log)) > e, timeout=180,
                     what="a new evaluation")  # fmt: skip
    for process in (aggregator, evaluator, *trainers):
        assert process.alive(), process.output()[-3000:]
    for trainer in trainers:
        assert trainer.terminate() == 0, trainer.output()[-3000:]
    confirmed = {uid for t in trainers for uid in confirmed_update_ids(t)} | set(probe_ids)
    wait_for(lambda: confirmed <= _applied(federation), timeout=120, what="all updates applied")
    assert evaluator.terminate() == 0, evaluator.output()[-3000:]
    assert aggregator.terminate() == 0, aggregator.output()[-3000:]
    saved = federation.checkpoint()
    assert saved is not None and finite(saved.weights)
    assert saved.updates_applied == len(saved.applied_ids) == saved.version
    assert logged(aggregator, "connected") >= 3  # first connection + one per restart
    versions = _logged_versions(eval_log)
    assert versions == sorted(set(versions))
    print(f"\nFAULTS broker_restarts=2 confirmed={len(confirmed)} applied={saved.updates_applied}")


def broker_app_restart(broker: PrivateBroker) -> None:
    """`rabbitmqctl stop_app` then `start_app`: the Erlang node stays up."""
    broker.stop_app()
    broker.start_app()


def broker_node_restart(broker: PrivateBroker) -> None:
    """`rabbitmqctl stop` then `rabbitmq-server -detached`: a new OS process."""
    broker.restart()
