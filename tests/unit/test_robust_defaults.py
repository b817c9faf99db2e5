"""The shipped defaults on pure code: what a task without robustness settings gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas import ModelUpdate, TaskSpec, Tensor
from services.aggregator.core import AggregatorCore
from services.aggregator.guard import GuardSettings
from services.aggregator.layout import ParamLayout
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.strategies.fedbuff import FedBuff
from services.aggregator.task import TaskDefinition, load_task
from services.aggregator.validation import RejectedUpdate

SIZE = 4
LAYOUT = ParamLayout.from_entries([("w", "float32", (SIZE,))])
REPO = Path(__file__).resolve().parents[2]


def _core(task: TaskDefinition) -> AggregatorCore:
    return AggregatorCore(
        task=task, layout=LAYOUT, weights=np.ones(SIZE, np.float32), integers={},
        strategy=build_strategy(task.strategy),
    )  # fmt: skip


def _update(values: list[float], trainer: str, *, examples: int = 10) -> ModelUpdate:
    return ModelUpdate(
        task_id="t", trainer_id=trainer, base_version=0, num_examples=examples,
        delta=(Tensor.from_numpy("w", np.asarray(values, np.float32)),),
    )  # fmt: skip


def _default_task(**strategy: object) -> TaskDefinition:
    return TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=StrategyConfig.model_validate(strategy),
    )


def test_a_task_without_settings_gets_fedbuff_uniform_weights_and_a_trimmed_mean() -> None:
    task = _default_task()
    strategy = build_strategy(task.strategy)
    assert isinstance(strategy, FedBuff)
    assert (strategy.buffer_size, strategy.aggregator, strategy.sample_weighted) == (
        4, "trimmed_mean", False,
    )  # fmt: skip
    assert task.guard == GuardSettings()
    assert task.guard.clip_to_median and task.guard.one_update_per_trainer


def test_the_shipped_task_file_has_the_robust_defaults() -> None:
    task = load_task(REPO / "infra" / "tasks" / "pneumonia.yaml")
    assert task.strategy.aggregator == "trimmed_mean" and not task.strategy.sample_weighted
    assert task.guard.norm_bound_factor is not None and task.guard.max_abs_weight is not None


def test_the_default_trimmed_mean_drops_one_value_per_side_at_the_default_buffer_size() -> None:
    # Given the default strategy (K=4) and one sign-flipped, 4x update among three honest ones
    task = _default_task()
    core = _core(task)
    for index, trainer in enumerate("abc"):
        core.submit(_update([0.1 + 0.01 * index] * SIZE, trainer), redelivered=False, now=0.0)
    outcome = core.submit(_update([-0.4] * SIZE, "evil"), redelivered=False, now=0.0)
    # Then the step is the mean of the middle two honest values: the attacker is trimmed
    assert outcome.status == "stepped"
    np.testing.assert_allclose(core.weights, 1.0 + 0.105, rtol=1e-6)


@pytest.mark.parametrize("claimed", [2**64 - 1, 10**18])
@pytest.mark.parametrize("sample_weighted", [False, True])
def test_an_inflated_num_examples_does_not_outweigh_the_other_sites(
    claimed: int, sample_weighted: bool
) -> None:
    # Given a FedBuff mean of K=2, by default uniform; or sample-weighted with join caps
    task = _default_task(aggregator="mean", buffer_size=2, sample_weighted=sample_weighted)
    core = _core(task)
    core.submit(_update([0.2] * SIZE, "honest"), redelivered=False, now=0.0, declared_examples=10)
    # When a site that declared 10 examples at its join claims `claimed` in its update
    core.submit(
        _update([-0.2] * SIZE, "liar", examples=claimed),
        redelivered=False,
        now=0.0,
        declared_examples=10,
    )
    # Then it weighs as much as the honest site: the two deltas cancel
    np.testing.assert_allclose(core.weights, 1.0, atol=1e-6)


def test_a_second_update_of_a_site_in_one_aggregate_is_refused() -> None:
    core = _core(_default_task())
    core.submit(_update([0.1] * SIZE, "flood"), redelivered=False, now=0.0)
    for _ in range(5):
        with pytest.raises(RejectedUpdate) as caught:
            core.submit(_update([0.1] * SIZE, "flood"), redelivered=False, now=0.0)
        assert caught.value.reason == "already-in-buffer"
    assert core.pending_ids and len(core.pending_ids) == 1
    assert core.updates_rejected == 5


def test_fedasync_keeps_the_mean_because_it_has_no_buffer_to_choose_from() -> None:
    assert StrategyConfig(name="fedasync").aggregator == "mean"
    assert StrategyConfig(name="fedavg").aggregator == "trimmed_mean"
    dp = StrategyConfig(dp_noise_multiplier=1.0, dp_clip_norm=1.0)
    assert (dp.aggregator, dp.sample_weighted) == ("mean", False)
