"""The trainer's local model: loading a global version, the delta it sends, FedBN, step limits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from schemas import GlobalModel, Tensor
from services.common.models import state_arrays
from services.common.training import TrainResult
from services.trainer.local_model import (
    DeltaNotFinite,
    LocalModel,
    ModelMismatch,
    clip_scale,
    global_arrays,
)
from services.trainer.local_round import (
    StepLimit,
    build_update,
    round_seed,
    run_local_round,
    train_config,
)
from tests.unit.test_trainer_support import global_model, tiny_dataset, tiny_spec

BN_WEIGHT = "features.1.weight"
BN_MEAN = "features.1.running_mean"
BN_COUNT = "features.1.num_batches_tracked"
CONV = "features.0.weight"


def _trained(spec_overrides: dict[str, object] | None = None, version: int = 1) -> LocalModel:
    local = LocalModel(tiny_spec(**(spec_overrides or {})))
    local.load_global(global_model(local.spec, version))
    run_local_round(local, tiny_dataset(), seed=0, stop=threading.Event())
    return local


def test_delta_is_local_minus_base_for_every_float_entry_and_nothing_else() -> None:
    # Given a model trained for one round from version 1
    local = _trained()
    base = global_arrays(global_model(local.spec, 1))
    trained = {k: np.asarray(v) for k, v in state_arrays(local.model).items()}

    # When its delta is taken
    delta = {t.name: t for t in local.delta(precision="float32")}

    # Then it has one tensor per float entry, equal to local - base, and no integer buffer
    assert BN_COUNT in trained and BN_COUNT not in delta
    assert set(delta) == {n for n, a in trained.items() if a.dtype == np.float32}
    for name, tensor in delta.items():
        expected = trained[name].astype(np.float32) - base[name].astype(np.float32)
        np.testing.assert_array_equal(tensor.to_numpy(), expected)
    assert np.abs(delta[CONV].to_numpy()).max() > 0
    assert np.abs(delta[BN_MEAN].to_numpy()).max() > 0


def test_bfloat16_delta_is_the_float32_delta_rounded() -> None:
    local = _trained()
    exact = {t.name: t.to_numpy().astype(np.float32) for t in local.delta(precision="float32")}

    rounded = {t.name: t for t in local.delta(precision="bfloat16")}

    assert {t.dtype for t in rounded.values()} == {"bfloat16"}
    for name, tensor in rounded.items():
        rounded_values = tensor.to_numpy().astype(np.float32)
        np.testing.assert_allclose(rounded_values, exact[name], rtol=2**-8, atol=1e-30)


def test_fedbn_keeps_the_local_batchnorm_entries_when_a_new_global_model_arrives() -> None:
    # Given a FedBN site that trained once (its BatchNorm statistics are now its own)
    local = _trained({"fedbn": True})
    own = {k: v.copy() for k, v in state_arrays(local.model).items()}
    newer = global_model(local.spec, 2, seed=99)
    incoming = global_arrays(newer)

    # When version 2 is loaded
    local.load_global(newer)

    # Then the convolution comes from version 2 but BatchNorm entries stay the site's own
    after = state_arrays(local.model)
    np.testing.assert_array_equal(after[CONV], incoming[CONV])
    for name in (BN_WEIGHT, BN_MEAN, BN_COUNT):
        np.testing.assert_array_equal(after[name], own[name])
        assert not np.array_equal(after[name], incoming[name])
    assert local.base_version == 2


def test_without_fedbn_a_new_global_model_overwrites_batchnorm_too() -> None:
    local = _trained()
    newer = global_model(local.spec, 2, seed=99)

    local.load_global(newer)

    after = state_arrays(local.model)
    np.testing.assert_array_equal(after[BN_MEAN], global_arrays(newer)[BN_MEAN])


def test_fedbn_sends_zero_batchnorm_deltas_so_site_statistics_stay_at_the_site() -> None:
    local = _trained({"fedbn": True})

    delta = {t.name: t.to_numpy() for t in local.delta(precision="float32")}

    assert np.all(delta[BN_MEAN] == 0) and np.all(delta[BN_WEIGHT] == 0)
    assert np.abs(delta[CONV]).max() > 0


def test_reset_to_base_undoes_local_training() -> None:
    local = _trained()
    base = global_arrays(global_model(local.spec, 1))

    local.reset_to_base()

    after = state_arrays(local.model)
    for name, array in base.items():
        np.testing.assert_array_equal(after[name], array)


def test_a_global_model_of_another_architecture_is_refused() -> None:
    local = LocalModel(tiny_spec())
    alien = GlobalModel(
        task_id="pneumonia",
        version=1,
        tensors=(Tensor.from_numpy("fc.weight", np.zeros((2, 2), np.float32)),),
    )

    with pytest.raises(ModelMismatch, match="does not fit"):
        local.load_global(alien)


def test_diverged_weights_are_never_turned_into_an_update() -> None:
    local = _trained()
    next(iter(local.model.parameters())).data.fill_(float("nan"))

    with pytest.raises(DeltaNotFinite):
        local.delta(precision="float32")


def test_a_large_but_finite_delta_is_clipped_instead_of_called_diverged() -> None:
    # 1e20 squared overflows float32, not float64: the norm must still be finite.
    local = _trained()
    with torch.no_grad():
        next(iter(local.model.parameters())).add_(1e20)

    delta = local.delta(precision="float32", max_norm=1.0)

    norm = np.sqrt(sum(float(np.sum(t.to_numpy().astype(np.float64) ** 2)) for t in delta))
    assert norm <= 1.0


@pytest.mark.parametrize(
    ("norm", "bound", "expected"),
    [(1.0, None, 1.0), (0.5, 1.0, 1.0), (4.0, 1.0, 0.999 / 4.0)],
)
def test_clip_scale_only_shrinks_deltas_above_the_bound(
    norm: float, bound: float | None, expected: float
) -> None:
    assert clip_scale(norm, bound) == pytest.approx(expected)


def test_step_limit_stops_the_round_after_the_given_number_of_batches() -> None:
    local = LocalModel(tiny_spec(local_epochs=5, local_steps=4))
    local.load_global(global_model(local.spec, 0))

    result = run_local_round(local, tiny_dataset(), seed=0, stop=threading.Event())

    assert result.steps == 4


def test_step_limit_makes_up_the_simulated_pause_it_cut_short() -> None:
    # Given a straggler simulation (3x slower) limited to one batch
    local = LocalModel(tiny_spec())
    limit = StepLimit(local.model, 1, threading.Event(), slowdown=3.0)
    with limit:
        local.model(torch.zeros((2, 1, 8, 8)))  # the one allowed batch
        time.sleep(0.05)  # takes 50 ms
        assert limit()  # the poll after it ends the round (and cuts its pause)

    # When the round is over
    started = time.perf_counter()
    limit.finish_pause()

    # Then the missing pause of (3 - 1) x 50 ms is slept
    assert time.perf_counter() - started >= 0.095
    assert limit.steps == 1


def test_a_step_limited_straggler_round_counts_its_made_up_pause_in_its_seconds() -> None:
    # Given a 3x straggler limited to 2 batches of 150 ms each (a made-up pause of 300 ms)
    local = LocalModel(tiny_spec(local_epochs=5, local_steps=2))
    local.load_global(global_model(local.spec, 0))
    local.model.register_forward_hook(lambda *_: time.sleep(0.15))

    # When the round runs, timed from outside
    started = time.perf_counter()
    result = run_local_round(local, tiny_dataset(), seed=0, stop=threading.Event(), slowdown=3.0)
    outside = time.perf_counter() - started

    # Then its seconds cover the whole round, the last batch's pause included
    assert result.steps == 2
    assert outside - 0.15 <= result.seconds <= outside


def test_a_stop_request_ends_the_round_before_the_next_batch() -> None:
    local = LocalModel(tiny_spec(local_epochs=3))
    local.load_global(global_model(local.spec, 0))
    stop = threading.Event()
    stop.set()

    result = run_local_round(local, tiny_dataset(), seed=0, stop=stop)

    assert result.steps == 0 and result.stopped_early


def test_round_seeds_differ_per_round_and_per_trainer_seed() -> None:
    seeds = {round_seed(s, r) for s in range(3) for r in range(100)}
    assert len(seeds) == 300


def test_an_update_without_any_batch_leaves_the_loss_out_of_its_metrics() -> None:
    local = _trained()
    result = TrainResult(
        mean_loss=float("nan"), num_examples=24, steps=0, seconds=0.0,
        stopped_early=True, examples_seen=0,
    )  # fmt: skip

    update = build_update(local, result, trainer_id="site-a", update_id="fixed-id")

    assert "train_loss" not in update.metrics
    assert update.update_id == "fixed-id"
    assert update.base_version == 1


def test_the_task_spec_logit_adjustment_changes_what_a_local_round_learns() -> None:
    plain = {t.name: t.to_numpy() for t in _trained().delta(precision="float32")}
    adjusted_local = _trained({"logit_adjustment": 1.0})
    adjusted = {t.name: t.to_numpy() for t in adjusted_local.delta(precision="float32")}
    assert train_config(adjusted_local.spec, seed=0).logit_adjustment == 1.0
    assert any(not np.array_equal(plain[name], adjusted[name]) for name in plain)
