"""The DP release count survives a restore from an older checkpoint: epsilon never goes back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas import TaskSpec
from services.aggregator.accounting import privacy_accountant
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.core import AggregatorCore
from services.aggregator.layout import ParamLayout
from services.aggregator.privacy_ledger import LEDGER_NAME, PrivacyLedger
from services.aggregator.service import AggregatorService
from services.aggregator.settings import AggregatorSettings
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.task import TaskDefinition
from services.common.bus.memory import InMemoryBus

LAYOUT = ParamLayout.from_entries([("w", "float32", (4,))])


def test_the_ledger_only_grows_and_survives_a_restart(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.record(7, epsilon=9.01)
    ledger.record(3)
    assert PrivacyLedger(tmp_path).steps == 7


def test_an_unreadable_ledger_stops_the_aggregator_instead_of_resetting_epsilon(
    tmp_path: Path,
) -> None:
    (tmp_path / LEDGER_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable privacy ledger"):
        PrivacyLedger(tmp_path)


def test_given_an_older_checkpoint_when_the_aggregator_starts_then_epsilon_counts_from_the_ledger(
    tmp_path: Path,
) -> None:
    # Given a DP task whose ledger recorded 12 releases, restored from a checkpoint at 2
    task = TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=StrategyConfig(
            name="fedbuff", buffer_size=2, dp_noise_multiplier=1.0, dp_clip_norm=1.0
        ),
    )
    strategy = build_strategy(task.strategy)
    strategy.load_state_dict({**strategy.state_dict(), "privacy.steps": 2})
    core = AggregatorCore(
        task=task,
        layout=LAYOUT,
        weights=np.zeros(4, np.float32),
        integers={},
        strategy=strategy,
    )
    core.accountant = privacy_accountant(strategy)
    assert core.accountant is not None
    PrivacyLedger(tmp_path).record(12)
    at_two = core.accountant.epsilon
    # When the service is built on that store
    AggregatorService(
        bus=InMemoryBus(),
        task=task,
        core=core,
        store=CheckpointStore(tmp_path),
        settings=AggregatorSettings(checkpoint_dir=tmp_path),
    )
    # Then the accountant counts 12 releases, and epsilon is that of 12, not of 2
    assert core.accountant.steps == 12
    assert core.accountant.epsilon > at_two
