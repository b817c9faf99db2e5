"""A site that lies about its size or floods the queue, against a real aggregator process.

Real broker, real `fedmq aggregator`; the hostile site is a hand-made trainer
(`FederationProbe`) that joins like any other and then misbehaves.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from schemas import GlobalModel
from tests.support.fault_kit import FaultFederation, wait_serving
from tests.support.probe import DeadLetter, FederationProbe

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]

STEP = 1e-3


@pytest.fixture
def federation(amqp_url: str, tmp_path: Path) -> Iterator[FaultFederation]:
    fed = FaultFederation(
        amqp_url=amqp_url, run_dir=tmp_path, data_dir=tmp_path,
        task_id=f"adv-defaults-{uuid.uuid4().hex[:8]}",
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


def _floats(model: GlobalModel) -> np.ndarray:
    return np.concatenate([t.to_numpy().ravel() for t in model.tensors if t.dtype == "float32"])


def test_a_site_claiming_2_64_or_1e18_examples_does_not_outweigh_an_honest_one(
    federation: FaultFederation,
) -> None:
    # Given size-weighted means of 2 updates, the only defence left the cap at the join size
    aggregator = federation.aggregator(
        "--task-id", federation.task_id, "--sample-weighted", "--aggregator", "mean",
        "--buffer-size", "2", "--staleness", "constant",
    )  # fmt: skip
    wait_serving(aggregator)
    honest, liar = _probes(federation, ["honest", "liar"])
    model = honest.join().model  # both join declaring 100 examples
    liar.join()
    for version, claimed in enumerate((2**64 - 1, 10**18)):
        # When the liar sends the opposite delta claiming `claimed` examples
        honest.publish(honest.update(model, STEP))
        liar.publish(liar.update(model, -STEP, num_examples=claimed))
        newest = honest.newest_model(min_version=version + 1, timeout=60)
        # Then the two weigh alike: the step cancels out
        moved = np.abs(_floats(newest) - _floats(model)).max()
        assert moved < STEP / 100, f"claim {claimed}: the model moved by {moved}"
        model = newest
    assert aggregator.alive()


def test_a_site_flooding_one_version_counts_once_per_aggregate(
    federation: FaultFederation,
) -> None:
    # Given an aggregator with the shipped defaults (FedBuff K=4, one update per site)
    aggregator = federation.aggregator("--task-id", federation.task_id)
    wait_serving(aggregator)
    flood, *honest = _probes(federation, ["flood", "site-a", "site-b", "site-c"])
    model = flood.join().model
    # When one site sends 10 updates on version 0 before three honest sites send theirs
    sent = {flood.publish(flood.update(model, STEP)) for _ in range(10)}
    for probe in honest:
        probe.publish(probe.update(model, STEP))
    # Then 9 of its updates are dead-lettered with a reason, and the aggregate takes one
    letters = _letters_of(flood, sent, count=9)
    assert [d.reason for d in letters] == ["already-in-buffer"] * 9
    newest = flood.newest_model(min_version=1, timeout=60)
    assert newest.updates_applied == 4
    assert aggregator.alive()
