"""Updates that would blow the model up, and a bad checkpoint on disk, against a real aggregator.

A real `fedmq aggregator` process with the shipped defaults on the real broker; the
attacker is a hand-made trainer (`FederationProbe`) sending well-formed updates whose
values are finite but huge. Every test checks that the aggregator keeps running, keeps
applying valid updates, and never writes a checkpoint holding a value that is not finite.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from schemas import GlobalModel
from services.aggregator.checkpoint import load_checkpoint, write_checkpoint
from tests.support.fault_kit import EventTap, FaultFederation, finite, logged, wait_serving
from tests.support.probe import DeadLetter, FederationProbe
from tests.support.processes import ServiceProcess, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]

SMALL = 1e-4
"""An honest-looking delta: far inside every bound of cnn-small (model norm about 40)."""
BUFFER = 4
"""The shipped FedBuff buffer: one step per 4 updates from 4 different sites."""


@pytest.fixture
def federation(amqp_url: str, tmp_path: Path) -> Iterator[FaultFederation]:
    fed = FaultFederation(
        amqp_url=amqp_url, run_dir=tmp_path, data_dir=tmp_path,
        task_id=f"adv-guard-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    yield fed
    fed.close()


def _letters_of(
    probe: FederationProbe, message_ids: set[str], *, count: int, timeout: float = 60.0
) -> list[DeadLetter]:
    """Dead letters of `message_ids` (the broker is shared: others dead-letter too)."""
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + timeout
    while len(letters) < count and time.monotonic() < deadline:
        letters += [d for d in probe.dead_letters() if d.message_id in message_ids]
        time.sleep(0.2)
    return letters


def _probes(federation: FaultFederation, names: list[str]) -> list[FederationProbe]:
    bus = federation.bus()
    return [
        FederationProbe(bus, federation.task_id, name, amqp_url=federation.amqp_url)
        for name in names
    ]


def _step(probes: list[FederationProbe], model: GlobalModel) -> None:
    """One valid aggregate: a small update from each of `BUFFER` sites."""
    for probe in probes[:BUFFER]:
        probe.publish(probe.update(model, SMALL))


def _checkpoints_are_finite(federation: FaultFederation) -> list[int]:
    """Load every checkpoint file on disk (loading refuses NaN/Inf); their versions."""
    directory = federation.checkpoint_root / federation.task_id
    versions = []
    for path in sorted(directory.glob("checkpoint-*.ckpt")):
        saved = load_checkpoint(path)
        assert finite(saved.weights), path
        versions.append(saved.version)
    return versions


def _start(federation: FaultFederation) -> ServiceProcess:
    aggregator = federation.aggregator("--task-id", federation.task_id)
    wait_serving(aggregator)
    return aggregator


def test_updates_of_1e30_and_3e38_are_refused_and_valid_updates_still_apply(
    federation: FaultFederation,
) -> None:
    # Given an aggregator with the shipped defaults, four honest sites and an attacker
    tap = EventTap(federation.amqp_url, federation.task_id)
    aggregator = _start(federation)
    *honest, attacker = _probes(federation, ["site-a", "site-b", "site-c", "site-d", "evil"])
    model = attacker.join().model
    # When the attacker sends an update of 1e30 and one of 3e38 (both finite float32)
    sent = {attacker.publish(attacker.update(model, value)): value for value in (1e30, 3e38)}
    # Then both are dead-lettered with the model guard's reason
    letters = _letters_of(attacker, set(sent), count=2)
    assert sorted(d.reason for d in letters) == ["model-guard", "model-guard"], letters
    assert all("bound" in d.detail for d in letters)
    wait_for(lambda: len(tap.of("update.rejected")) >= 2, timeout=20, what="update.rejected")
    assert {e["reason"] for e in tap.of("update.rejected")} == {"model-guard"}
    assert {e["trainer_id"] for e in tap.of("update.rejected")} == {"evil"}
    # And the aggregator keeps running and applies the next valid aggregate
    _step(honest, model)
    newest = attacker.newest_model(min_version=1, timeout=60)
    assert aggregator.alive()
    assert newest.updates_applied == BUFFER
    weights = np.concatenate([t.to_numpy().ravel() for t in newest.tensors if t.dtype == "float32"])
    assert finite(weights) and float(np.abs(weights).max()) < 10.0
    # And no checkpoint on disk holds a value that is not finite
    assert _checkpoints_are_finite(federation)[-1] >= 1
    tap.close()


def test_a_restart_over_a_bad_newest_checkpoint_resumes_from_the_previous_good_one(
    federation: FaultFederation,
) -> None:
    # Given an aggregator that made versions 1 and 2 durable, then stopped
    aggregator = _start(federation)
    probes = _probes(federation, ["site-a", "site-b", "site-c", "site-d"])
    model = probes[0].join().model
    _step(probes, model)
    model = probes[0].newest_model(min_version=1, timeout=60)
    _step(probes, model)
    probes[0].newest_model(min_version=2, timeout=60)
    assert aggregator.terminate() == 0
    directory = federation.checkpoint_root / federation.task_id
    # When the newest checkpoint on disk holds Inf (as an older aggregator could write)
    newest = max(directory.glob("checkpoint-*.ckpt"))
    bad = load_checkpoint(newest)
    assert bad.version == 2
    bad.weights = np.full_like(bad.weights, np.inf)
    write_checkpoint(directory, bad)
    # Then a restart serves the previous good version instead of exiting
    restarted = _start(federation)
    assert logged(restarted, "checkpoint_unreadable") >= 1
    (newcomer,) = _probes(federation, ["site-e"])
    rejoined = newcomer.join().model
    assert rejoined.version == 1
    # And it applies valid updates again, overwriting the bad file with a good version 2
    _step(probes, rejoined)
    newcomer.newest_model(min_version=2, timeout=60)
    assert restarted.alive()
    assert 2 in _checkpoints_are_finite(federation)
