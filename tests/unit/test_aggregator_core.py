"""The aggregator's state machine: validation reasons, exactly-once application, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas import ModelUpdate, TaskSpec, Tensor
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.core import AggregatorCore
from services.aggregator.guard import GUARDS_OFF
from services.aggregator.layout import ParamLayout
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.task import TaskDefinition
from services.aggregator.validation import RejectedUpdate

LAYOUT = ParamLayout.from_entries(
    [
        ("w", "float32", (3,)),
        ("bn.weight", "float32", (1,)),
        ("bn.num_batches_tracked", "int64", ()),
    ],
    bn_prefixes={"bn"},
)


def _task(**strategy: object) -> TaskDefinition:
    config = {
        "name": "fedasync", "alpha": 0.5, "staleness": "polynomial", "staleness_a": 1.0,
        "aggregator": "mean", "sample_weighted": True,
    }  # fmt: skip
    config.update(strategy)
    return TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2, max_update_norm=100.0),
        strategy=StrategyConfig.model_validate(config),
        guard=GUARDS_OFF,  # the guards have their own tests (test_model_guard.py)
    )


def _core(task: TaskDefinition | None = None) -> AggregatorCore:
    task = task or _task()
    return AggregatorCore(
        task=task,
        layout=LAYOUT,
        weights=np.zeros(4, np.float32),
        integers={"bn.num_batches_tracked": np.array(5, np.int64)},
        strategy=build_strategy(task.strategy),
    )


def _update(delta: list[float], *, base: int = 0, **fields: object) -> ModelUpdate:
    tensors = (
        Tensor.from_numpy("w", np.asarray(delta[:3], np.float32)),
        Tensor.from_numpy("bn.weight", np.asarray(delta[3:], np.float32)),
    )
    values: dict[str, object] = {
        "task_id": "t",
        "trainer_id": "a",
        "base_version": base,
        "num_examples": 10,
        "delta": tensors,
    }
    values.update(fields)
    return ModelUpdate.model_validate(values)


def _reason(core: AggregatorCore, update: ModelUpdate) -> str:
    with pytest.raises(RejectedUpdate) as caught:
        core.submit(update, redelivered=False, now=0.0)
    return caught.value.reason


def test_a_fresh_fedasync_update_moves_the_model_by_alpha_times_delta() -> None:
    core = _core()
    outcome = core.submit(_update([2.0, 4.0, -2.0, 1.0]), redelivered=False, now=0.0)
    assert outcome.status == "stepped"
    assert core.version == 1
    np.testing.assert_allclose(core.weights, [1.0, 2.0, -1.0, 0.5])


def test_a_stale_update_is_down_weighted_by_polynomial_staleness() -> None:
    core = _core()
    core.submit(_update([0.0, 0.0, 0.0, 0.0]), redelivered=False, now=0.0)
    before = core.weights.copy()
    core.submit(_update([4.0, 0.0, 0.0, 0.0], base=0), redelivered=False, now=0.0)
    # staleness 1: alpha * (1 + 1)^-1 = 0.25
    np.testing.assert_allclose(core.weights - before, [1.0, 0.0, 0.0, 0.0])


def test_an_update_for_another_task_is_rejected_as_unknown_task() -> None:
    assert _reason(_core(), _update([1, 1, 1, 1], task_id="other")) == "unknown-task"


def test_a_wrong_shape_is_rejected_with_the_tensor_named() -> None:
    good = _update([1, 1, 1, 1])
    wrong_w = Tensor.from_numpy("w", np.ones(5, np.float32))
    bad = good.model_copy(update={"delta": (wrong_w, good.delta[1])})
    with pytest.raises(RejectedUpdate) as caught:
        _core().submit(bad, redelivered=False, now=0.0)
    assert caught.value.reason == "shape-mismatch"
    assert "'w'" in caught.value.detail


def test_an_update_above_the_norm_bound_is_rejected() -> None:
    assert _reason(_core(), _update([100.0, 100.0, 0.0, 0.0])) == "norm-too-large"


def test_an_update_beyond_max_staleness_is_rejected_as_stale() -> None:
    core = _core(_task(max_staleness=1))
    for _ in range(3):
        core.submit(_update([0, 0, 0, 0], base=core.version), redelivered=False, now=0.0)
    assert _reason(core, _update([1, 1, 1, 1], base=0)) == "stale"
    assert core.updates_rejected == 1


def test_an_update_from_the_future_is_rejected() -> None:
    assert _reason(_core(), _update([1, 1, 1, 1], base=7)) == "future-version"


def test_the_same_update_sent_twice_is_rejected_as_duplicate() -> None:
    core = _core()
    update = _update([1, 1, 1, 1])
    core.submit(update, redelivered=False, now=0.0)
    assert _reason(core, update) == "duplicate"
    assert core.version == 1


def test_a_redelivery_of_an_applied_update_is_recognised_and_not_applied_again() -> None:
    core = _core()
    update = _update([2, 2, 2, 2])
    core.submit(update, redelivered=False, now=0.0)
    weights = core.weights.copy()
    outcome = core.submit(update, redelivered=True, now=0.0)
    assert outcome.status == "redelivered"
    np.testing.assert_array_equal(core.weights, weights)
    assert core.updates_applied == 1


def test_fedbuff_holds_updates_as_pending_until_the_buffer_is_full() -> None:
    core = _core(_task(name="fedbuff", buffer_size=2, staleness="constant"))
    first = _update([2, 0, 0, 0], num_examples=10)
    assert core.submit(first, redelivered=False, now=0.0).status == "buffered"
    assert core.pending_ids == {first.update_id}
    outcome = core.submit(_update([0, 2, 0, 0], num_examples=30), redelivered=False, now=0.0)
    assert outcome.status == "stepped"
    assert outcome.step is not None and len(outcome.step.applied) == 2
    np.testing.assert_allclose(core.weights, [0.5, 1.5, 0.0, 0.0])
    assert core.pending_ids == frozenset()


def test_fedbn_keeps_batchnorm_entries_at_their_global_value() -> None:
    task = _task()
    task = task.model_copy(update={"spec": task.spec.model_copy(update={"fedbn": True})})
    core = _core(task)
    core.submit(_update([2.0, 2.0, 2.0, 8.0]), redelivered=False, now=0.0)
    np.testing.assert_allclose(core.weights, [1.0, 1.0, 1.0, 0.0])


def test_integer_batchnorm_counters_travel_unchanged_in_the_global_model() -> None:
    core = _core()
    core.submit(_update([1, 1, 1, 1]), redelivered=False, now=0.0)
    model = core.global_model()
    tensors = {t.name: t for t in model.tensors}
    assert tensors["bn.num_batches_tracked"].dtype == "int64"
    assert tensors["bn.num_batches_tracked"].to_numpy().item() == 5
    assert model.version == 1


def test_a_checkpoint_restores_weights_version_and_applied_ids(tmp_path: Path) -> None:
    core = _core()
    applied = _update([2, 2, 2, 2])
    core.submit(applied, redelivered=False, now=0.0)
    store = CheckpointStore(tmp_path)
    store.save(core.checkpoint())
    task = _task()
    saved = store.latest()
    assert saved is not None
    restored = AggregatorCore.restore(
        task=task, layout=LAYOUT, strategy=build_strategy(task.strategy), saved=saved
    )
    assert restored.version == 1
    np.testing.assert_array_equal(restored.weights, core.weights)
    assert restored.submit(applied, redelivered=True, now=0.0).status == "redelivered"


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_core().checkpoint())
    other = _task()
    other = other.model_copy(update={"spec": other.spec.model_copy(update={"model": "resnet18"})})
    saved = store.latest()
    assert saved is not None
    with pytest.raises(ValueError, match="resnet18"):
        AggregatorCore.restore(
            task=other, layout=LAYOUT, strategy=build_strategy(other.strategy), saved=saved
        )


def test_the_store_keeps_only_the_newest_checkpoints_and_skips_an_unreadable_one(
    tmp_path: Path,
) -> None:
    core = _core()
    store = CheckpointStore(tmp_path, keep=2)
    for _ in range(4):
        core.submit(_update([1, 0, 0, 0], base=core.version), redelivered=False, now=0.0)
        store.save(core.checkpoint())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-000000000003.ckpt", "checkpoint-000000000004.ckpt"]
    (tmp_path / names[-1]).write_bytes(b"torn write")
    saved = store.latest()
    assert saved is not None and saved.version == 3


def test_batchnorm_variances_never_go_below_a_small_positive_floor() -> None:
    layout = ParamLayout.from_entries(
        [("bn.running_var", "float32", (2,)), ("w", "float32", (1,))], bn_prefixes={"bn"}
    )
    task = _task()
    core = AggregatorCore(
        task=task,
        layout=layout,
        weights=np.array([0.1, 0.1, 0.0], np.float32),
        integers={},
        strategy=build_strategy(task.strategy),
    )
    update = ModelUpdate(
        task_id="t",
        trainer_id="a",
        base_version=0,
        num_examples=1,
        delta=(
            Tensor.from_numpy("bn.running_var", np.array([-1.0, 0.2], np.float32)),
            Tensor.from_numpy("w", np.array([-4.0], np.float32)),
        ),
    )
    core.submit(update, redelivered=False, now=0.0)
    np.testing.assert_allclose(core.weights, [1e-5, 0.2, -2.0], rtol=1e-6)
