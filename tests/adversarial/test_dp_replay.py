"""A restore must not replay DP noise nor roll epsilon back (real aggregator processes).

A site that sees the same version released twice with the same noise subtracts the two and
learns the difference of the underlying aggregates; an accountant that restarts at an old
step count lets the budget be spent twice. Here a DP aggregator releases two versions, is
killed, restarts from the older checkpoint, and releases "version 2" again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from schemas import GlobalModel
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.privacy_ledger import LEDGER_NAME
from services.common.bus.pika_bus import PikaBus
from tests.support.fault_kit import FaultFederation, wait_serving
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.adversarial, pytest.mark.broker, pytest.mark.slow]

DP_FLAGS = ("--strategy", "fedbuff", "--buffer-size", "1", "--staleness", "constant",
            "--uniform-weights", "--dp-noise-multiplier", "1",
            "--dp-clip-norm", "0.001")  # fmt: skip
"""One release per update, noise of std 0.001 per coordinate (z = 1, C = 0.001, K = 1)."""


@pytest.fixture
def federation(amqp_url: str, tmp_path: Path) -> Iterator[FaultFederation]:
    fed = FaultFederation(
        amqp_url=amqp_url, run_dir=tmp_path, data_dir=tmp_path,
        task_id=f"adv-dp-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    yield fed
    fed.close()


def _floats(model: GlobalModel) -> np.ndarray:
    return np.concatenate(
        [t.to_numpy().ravel() for t in model.tensors if t.dtype.startswith("float")]
    )


def _ledger(federation: FaultFederation) -> dict[str, float]:
    path = federation.checkpoint_root / federation.task_id / LEDGER_NAME
    ledger: dict[str, float] = json.loads(path.read_text())
    return ledger


def _serve(federation: FaultFederation) -> ServiceProcess:
    aggregator = federation.aggregator(*DP_FLAGS)
    wait_serving(aggregator)
    return aggregator


@pytest.fixture
def bus(federation: FaultFederation) -> Iterator[PikaBus]:
    with federation.bus() as opened:
        yield opened


def test_a_version_released_again_after_a_restore_has_fresh_noise_and_epsilon_goes_on(
    federation: FaultFederation, bus: PikaBus
) -> None:
    # Given a DP aggregator that released versions 1 and 2 from zero deltas
    aggregator = _serve(federation)
    probe = FederationProbe(bus, federation.task_id, "site-a", amqp_url=federation.amqp_url)
    start = probe.join().model
    probe.publish(probe.update(start, 0.0))
    first = probe.newest_model(min_version=1)
    probe.publish(probe.update(first, 0.0))
    second = probe.newest_model(min_version=2)
    assert _ledger(federation)["steps"] == 2
    epsilon_two = _ledger(federation)["epsilon"]
    # When it dies and restarts from the checkpoint of version 1 (version 2's is gone)
    aggregator.kill()
    store = CheckpointStore(federation.checkpoint_root / federation.task_id)
    (store.directory / f"checkpoint-{2:012d}.ckpt").unlink()
    latest = store.latest()
    assert latest is not None and latest.version == 1
    probe.latest = None  # forget version 2: only a new release may answer below
    _serve(federation)
    # and version 2 is released again from the same base and the same zero delta
    probe.publish(probe.update(first, 0.0))
    again = probe.newest_model(min_version=2)
    # Then the two releases carry independent noise (std 0.001 each), not the same one
    difference = _floats(again) - _floats(second)
    assert float(np.median(np.abs(difference))) > 3e-4
    # and the accountant counts a third release: epsilon only grew
    assert _ledger(federation)["steps"] == 3
    assert _ledger(federation)["epsilon"] > epsilon_two
