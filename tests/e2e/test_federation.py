"""A real federation: aggregator, evaluator and trainers as processes on the real broker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from services.common.bus import Bus
from services.common.bus.pika_bus import PikaBus
from services.common.settings import DEFAULT_AMQP_URL
from services.demo.federation import Federation, FederationPlan
from services.demo.status import FederationStatus
from services.demo.watcher import EventWatcher
from tests.datagen import pneumonia_npz

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def bus() -> Iterator[Bus]:
    with PikaBus(DEFAULT_AMQP_URL) as connected:
        yield connected


def _until(
    watcher: EventWatcher, condition: Callable[[], bool], *, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watcher.poll()
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {watcher.status}")


def _majority_rate(npz: Path) -> float:
    labels = np.load(npz)["test_labels"].ravel()
    return float(np.bincount(labels).max() / labels.size)


def _best_logged_accuracy(log: Path) -> float:
    if not log.exists():
        return 0.0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return max((line["accuracy"] for line in lines if line["split"] == "test"), default=0.0)


def test_trainers_join_and_leave_while_the_model_improves(bus: Bus, tmp_path: Path) -> None:
    # Given an aggregator, an evaluator and 3 of 4 simulated hospitals on PneumoniaMNIST
    npz = pneumonia_npz(tmp_path / "data")
    plan = FederationPlan(
        task_id=f"e2e-{uuid.uuid4().hex[:8]}",
        run_dir=tmp_path / "run",
        trainers=4,
        strategy="fedbuff",
        partition="iid",
        data_dir=npz.parent,
        aggregator_flags=(
            "--buffer-size",
            "2",
            "--local-steps",
            "12",
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
        ),
    )
    status = FederationStatus(task_id=plan.task_id)
    watcher = EventWatcher(bus, status)
    federation = Federation(plan)
    federation.start(trainers=3)
    try:
        _until(watcher, lambda: status.updates_applied >= 4, timeout=300, what="4 updates")
        # When a 4th hospital joins while the federation runs
        applied_before = status.updates_applied
        federation.add_trainer(3)
        _until(
            watcher,
            lambda: (
                status.updates_sent.get("site-3", 0) >= 1
                and status.updates_applied > applied_before
            ),
            timeout=240,
            what="an update from site-3",
        )
        # and one hospital is stopped with SIGTERM
        assert federation.stop_trainer(0) == 0
        _until(
            watcher,
            lambda: status.trainers.get("site-0") == "left",
            timeout=30,
            what="site-0 leaving",
        )
        # Then the model keeps improving past the majority-class rate
        majority = _majority_rate(npz)
        _until(
            watcher,
            lambda: _best_logged_accuracy(federation.eval_log) > majority + 0.05,
            timeout=300,
            what=f"test accuracy above {majority:.3f}",
        )
    finally:
        codes = federation.stop()
        watcher.close()
    assert status.rejected_by_trainer["site-3"] == 0
    assert status.trainers["site-0"] == "left"
    assert all(code == 0 for code in codes.values()), codes
