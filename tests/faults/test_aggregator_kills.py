"""SIGKILL the aggregator again and again while four real trainers keep sending updates."""

from __future__ import annotations

import random
import time

import pytest

from tests.support.fault_kit import (
    EventTap,
    FaultFederation,
    confirmed_update_ids,
    drain_dead_letters,
    finite,
    log_events,
    wait_serving,
)
from tests.support.processes import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.e2e]

KILLS = 5
SEED = 20240611
TRAINERS = 4
AGGREGATOR_FLAGS = (
    "--model", "cnn-small", "--strategy", "fedasync", "--alpha", "0.3",
    "--staleness", "polynomial", "--local-steps", "2", "--batch-size", "32",
)  # fmt: skip


def _applied(federation: FaultFederation) -> tuple[int, set[str], int]:
    saved = federation.checkpoint()
    assert saved is not None
    return saved.version, set(saved.applied_ids), saved.updates_applied


def _durable_version(federation: FaultFederation) -> int:
    saved = federation.checkpoint()
    return -1 if saved is None else saved.version


def test_an_aggregator_killed_five_times_loses_no_update_and_applies_none_twice(
    federation: FaultFederation,
) -> None:
    """Five SIGKILLs at seeded random moments: every confirmed update is applied exactly once,
    versions never go back, each restart resumes from the checkpoint, trainers never restart."""
    rng = random.Random(SEED)
    tap = EventTap(federation.amqp_url, federation.task_id)
    aggregator = federation.aggregator(*AGGREGATOR_FLAGS)
    trainers = [
        federation.trainer(f"site-{i}", site=i, sites=TRAINERS, FEDMQ_SIMULATED_SLOWDOWN="4")
        for i in range(TRAINERS)
    ]
    trainer_pids = [t.pid for t in trainers]
    wait_serving(aggregator)
    resumed_at: list[tuple[int, int]] = []  # (durable version at the kill, version resumed)
    try:
        for _ in range(KILLS):
            # Given a federation that made progress since the last (re)start
            before = _durable_version(federation)
            wait_for(
                lambda b=before: _durable_version(federation) > b,
                timeout=120,
                what="a new durable version",
            )
            # When the aggregator is SIGKILLed at a random moment and started again
            time.sleep(rng.uniform(0.0, 2.5))
            aggregator.kill()
            at_kill = _durable_version(federation)
            aggregator = federation.aggregator(*AGGREGATOR_FLAGS)
            wait_serving(aggregator)
            (resumed,) = log_events(aggregator, "resuming_from_checkpoint")
            resumed_at.append((at_kill, resumed["version"]))
        # Then the trainers, never restarted, keep sending updates that the last one applies
        sent_before = {t.pid: len(confirmed_update_ids(t)) for t in trainers}
        wait_for(
            lambda: all(len(confirmed_update_ids(t)) > sent_before[t.pid] + 1 for t in trainers),
            timeout=120,
            what="two more updates from every trainer",
        )
        for trainer in trainers:
            assert trainer.alive(), trainer.output()[-2000:]
            assert trainer.terminate() == 0, trainer.output()[-2000:]
        confirmed = {uid for t in trainers for uid in confirmed_update_ids(t)}
        wait_for(
            lambda: confirmed <= _applied(federation)[1],
            timeout=120,
            what="every confirmed update to be applied",
        )
        assert aggregator.terminate() == 0, aggregator.output()[-3000:]
    finally:
        tap.close()
    version, applied, updates_applied = _applied(federation)
    saved = federation.checkpoint()
    assert saved is not None
    published = [event["version"] for event in tap.of("model.published")]
    dead = [
        d for d in drain_dead_letters(federation.amqp_url) if federation.task_id in d.routing_key
    ]
    # every restart resumed from the checkpoint on disk when it was killed
    assert [v for _, v in resumed_at] == [k for k, _ in resumed_at]
    # versions never went backwards, across five restarts
    assert published == sorted(published) and published[-1] == version
    # exactly once: every confirmed update is in the model, and none was counted twice
    assert confirmed <= applied
    assert updates_applied == len(applied) == version  # FedAsync: one version per update
    assert not dead, dead[:5]
    assert finite(saved.weights)
    assert [t.pid for t in trainers] == trainer_pids
    assert len(confirmed) >= 2 * TRAINERS + KILLS
    print(
        f"\nFAULTS kills={KILLS} version={version} confirmed={len(confirmed)} "
        f"applied={updates_applied} resumed={resumed_at}"
    )
