"""The aggregator's guards on pure code: finite bounded models, the median norm bound, clipping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas import ModelUpdate, TaskSpec, Tensor
from services.aggregator.checkpoint import CheckpointStore, checkpoint_name
from services.aggregator.core import AggregatorCore
from services.aggregator.guard import GuardSettings, ModelGuard, ModelStats, NormHistory
from services.aggregator.layout import ParamLayout
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.task import TaskDefinition
from services.aggregator.validation import RejectedStep, RejectedUpdate

SIZE = 16
LAYOUT = ParamLayout.from_entries([("w", "float32", (SIZE,))])
ONES = np.ones(SIZE, np.float32)  # a model of norm 4


def _task(guard: GuardSettings | None = None, **strategy: object) -> TaskDefinition:
    # FedAsync keeps these tests one step per update; every guard explicitly on.
    config = {"name": "fedasync", "alpha": 0.5, "staleness": "constant", **strategy}
    return TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=StrategyConfig.model_validate(config),
        guard=guard or GuardSettings(),
    )


def _core(task: TaskDefinition | None = None) -> AggregatorCore:
    task = task or _task()
    return AggregatorCore(
        task=task, layout=LAYOUT, weights=ONES.copy(), integers={},
        strategy=build_strategy(task.strategy),
    )  # fmt: skip


def _update(value: float, *, trainer: str = "a", base: int = 0, **fields: object) -> ModelUpdate:
    delta = (Tensor.from_numpy("w", np.full(SIZE, value, np.float32)),)
    values = {"task_id": "t", "trainer_id": trainer, "base_version": base, "num_examples": 10}
    return ModelUpdate.model_validate({**values, **fields, "delta": delta})


def _refusal(core: AggregatorCore, update: ModelUpdate) -> RejectedUpdate:
    with pytest.raises(RejectedUpdate) as caught:
        core.submit(update, redelivered=False, now=0.0)
    return caught.value


@pytest.mark.parametrize("value", [1e30, 3e38, -3e38])
def test_an_update_of_huge_finite_values_is_refused_and_the_model_stays_as_it_was(
    value: float,
) -> None:
    # Given a FedAsync aggregator at version 0 whose model is all ones
    core = _core()
    # When an update of huge (finite float32) values arrives
    refusal = _refusal(core, _update(value))
    # Then it is refused by the model guard with a reason, and nothing changed
    assert refusal.reason == "model-guard"
    assert "bound" in refusal.detail
    assert core.version == 0 and core.updates_rejected == 1
    np.testing.assert_array_equal(core.weights, ONES)
    # And a valid update is still applied afterwards
    assert core.submit(_update(0.1), redelivered=False, now=0.0).status == "stepped"
    assert core.version == 1


def test_an_update_that_would_move_the_model_beyond_the_relative_bound_is_refused() -> None:
    core = _core(_task(GuardSettings(max_relative_change=1.0)))  # model norm 4
    assert _refusal(core, _update(1.2)).reason == "model-guard"  # delta norm 4.8
    assert core.submit(_update(0.9), redelivered=False, now=0.0).status == "stepped"  # 3.6


def test_after_the_warmup_an_update_above_3x_the_median_norm_is_a_norm_outlier() -> None:
    # Given 8 accepted updates of norm 0.4 (the warm-up)
    core = _core()
    for index in range(8):
        core.submit(_update(0.1, base=index), redelivered=False, now=0.0)
    # When an update 4x as long arrives, Then it is refused; 2.5x passes
    refusal = _refusal(core, _update(-0.4, base=8))
    assert refusal.reason == "norm-outlier"
    assert "median" in refusal.detail
    assert core.submit(_update(0.25, base=8), redelivered=False, now=0.0).status == "stepped"


def test_after_the_warmup_an_update_above_the_median_norm_is_clipped_to_it() -> None:
    # Given FedAsync with alpha 1 and 8 accepted updates of norm 0.4
    core = _core(_task(alpha=1.0))
    for index in range(8):
        core.submit(_update(0.1, base=index), redelivered=False, now=0.0)
    before = core.weights.copy()
    # When an update of norm 0.8 (2x the median) arrives
    core.submit(_update(0.2, base=8), redelivered=False, now=0.0)
    # Then it moved the model by the median norm only
    assert float(np.linalg.norm(core.weights - before)) == pytest.approx(0.4, rel=1e-5)


def test_a_step_beyond_the_weight_bound_is_refused_whole_and_the_strategy_rolls_back() -> None:
    # Given FedBuff K=2 with server lr 3 and a weight bound of 10 (each update alone passes)
    guard = GuardSettings(max_abs_weight=10.0, max_relative_change=None)
    task = _task(guard, name="fedbuff", buffer_size=2, server_lr=3.0, aggregator="mean")
    core = _core(task)
    core.submit(_update(4.0, trainer="a"), redelivered=False, now=0.0)
    # When the second update completes a step that would put weights at 13
    with pytest.raises(RejectedStep) as caught:
        core.submit(_update(4.0, trainer="b"), redelivered=False, now=0.0)
    # Then both updates are refused, the model, version and strategy are as before
    assert caught.value.reason == "model-guard"
    assert len(caught.value.update_ids) == 2
    assert core.version == 0 and core.updates_rejected == 2 and core.pending_ids == frozenset()
    assert core.strategy.steps == 0 and core.strategy.pending() == ()
    np.testing.assert_array_equal(core.weights, ONES)
    # And the next two valid updates make a step
    core.submit(_update(0.1, trainer="a"), redelivered=False, now=0.0)
    assert core.submit(_update(0.1, trainer="b"), redelivered=False, now=0.0).status == "stepped"


def test_fedasync_gets_the_model_guard_but_neither_the_median_bound_nor_clipping() -> None:
    task = TaskDefinition.model_validate(
        {"spec": {"task_id": "t", "model": "cnn-small", "num_classes": 2},
         "strategy": {"name": "fedasync"}, "guard": {"clip_to_median": True}}
    )  # fmt: skip
    assert task.guard.norm_bound_factor is None and task.guard.clip_to_median
    assert task.guard.max_abs_weight is not None and task.guard.max_relative_change is not None
    fedbuff = TaskDefinition.model_validate(
        {"spec": {"task_id": "t", "model": "cnn-small", "num_classes": 2}}
    )
    assert fedbuff.guard == GuardSettings()


def test_the_guard_names_a_model_that_is_not_finite() -> None:
    guard = ModelGuard(GuardSettings())
    bad = ONES.copy()
    bad[3] = np.inf
    assert guard.check_step(ModelStats.of(bad)) == "the new model holds a value that is not finite"
    assert guard.check_step(ModelStats.of(ONES)) is None


def test_the_median_bound_and_clipping_wait_for_the_warmup() -> None:
    history = NormHistory(GuardSettings(norm_warmup=3))
    history.record(1.0)
    history.record(1.0)
    assert history.refusal(100.0) is None and history.clip_level() is None
    history.record(2.0)
    assert history.clip_level() == 1.0
    assert history.refusal(3.0) is None
    assert history.refusal(3.1) is not None


def test_the_recent_norms_survive_a_checkpoint_and_restart(tmp_path: Path) -> None:
    core = _core()
    for index in range(9):
        core.submit(_update(0.1, base=index), redelivered=False, now=0.0)
    store = CheckpointStore(tmp_path)
    store.save(core.checkpoint())
    saved = store.latest()
    assert saved is not None
    task = _task()
    restored = AggregatorCore.restore(
        task=task, layout=LAYOUT, strategy=build_strategy(task.strategy), saved=saved
    )
    assert restored.recent_norms == pytest.approx(core.recent_norms)
    assert _refusal(restored, _update(-0.4, base=9)).reason == "norm-outlier"


def test_the_store_refuses_to_write_weights_that_are_not_finite(tmp_path: Path) -> None:
    core = _core()
    saved = core.checkpoint()
    saved.weights = np.full(SIZE, np.inf, np.float32)
    with pytest.raises(ValueError, match="not finite"):
        CheckpointStore(tmp_path).save(saved)
    assert list(tmp_path.iterdir()) == []


def test_a_newest_checkpoint_with_an_inf_weight_is_skipped_for_the_previous_good_one(
    tmp_path: Path,
) -> None:
    # Given good checkpoints of versions 0 and 1, and a version 2 holding Inf on disk
    core = _core()
    store = CheckpointStore(tmp_path)
    store.save(core.checkpoint())
    core.submit(_update(0.1), redelivered=False, now=0.0)
    store.save(core.checkpoint())
    bad = core.checkpoint()
    bad.version = 2
    bad.weights = np.full(SIZE, np.inf, np.float32)
    from services.aggregator.checkpoint import write_checkpoint

    write_checkpoint(tmp_path, bad)  # bypasses the store's own check, as an old version did
    assert (tmp_path / checkpoint_name(2)).exists()
    # When the aggregator resumes, Then it resumes from version 1
    resumed = store.latest()
    assert resumed is not None and resumed.version == 1
    assert np.isfinite(resumed.weights).all()
