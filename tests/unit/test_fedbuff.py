"""FedBuff: buffer K updates, staleness- and sample-weighted mean, one server step."""

from __future__ import annotations

import numpy as np
import pytest

from services.aggregator.strategies.base import Contribution, StepResult
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.strategies.fedbuff import FedBuff
from services.aggregator.strategies.robust import l2_norm
from services.aggregator.strategies.server_optimizers import ServerAdam, ServerSGD
from services.aggregator.strategies.staleness import ConstantStaleness, PolynomialStaleness


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def contribution(
    uid: str, delta: np.ndarray, *, n: int = 1, staleness: int = 0, trainer: str | None = None
) -> Contribution:
    return Contribution(
        update_id=uid,
        trainer_id=trainer or f"trainer-{uid}",
        delta=delta,
        num_examples=n,
        staleness=staleness,
        base_version=10,
    )


def submit_all(
    strategy: FedBuff, weights: np.ndarray, contributions: list[Contribution]
) -> StepResult:
    results = [strategy.submit(weights, c, now=0.0) for c in contributions]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None
    return results[-1]


def test_fedbuff_steps_only_when_k_updates_are_buffered() -> None:
    # Given
    strategy = FedBuff(buffer_size=3, staleness=ConstantStaleness())
    weights = vec(0, 0, 0)

    # When
    first = strategy.submit(weights, contribution("a", vec(1, 0, 0)), now=0.0)
    second = strategy.submit(weights, contribution("b", vec(0, 1, 0)), now=1.0)
    pending_before = strategy.pending()
    third = strategy.submit(weights, contribution("c", vec(0, 0, 1)), now=2.0)

    # Then
    assert first is None and second is None
    assert pending_before == ("a", "b")
    assert third is not None
    assert third.applied == ("a", "b", "c")
    assert strategy.pending() == ()
    assert third.info["aggregated"] == 3.0


def test_the_aggregate_is_the_sample_weighted_mean_of_deltas() -> None:
    strategy = FedBuff(buffer_size=3, staleness=ConstantStaleness())
    batch = [
        contribution("a", vec(1, 0, 0), n=1),
        contribution("b", vec(0, 3, 0), n=2),
        contribution("c", vec(0, 0, 6), n=3),
    ]

    result = submit_all(strategy, vec(1, 1, 1), batch)

    # (1·[1,0,0] + 2·[0,3,0] + 3·[0,0,6]) / 6 = [1/6, 1, 3]
    np.testing.assert_allclose(result.weights, vec(1 + 1 / 6, 2, 4), rtol=1e-6)


def test_without_sample_weighting_every_update_counts_the_same() -> None:
    strategy = FedBuff(buffer_size=3, staleness=ConstantStaleness(), sample_weighted=False)
    batch = [
        contribution("a", vec(1, 0, 0), n=1),
        contribution("b", vec(0, 3, 0), n=2),
        contribution("c", vec(0, 0, 6), n=3),
    ]

    result = submit_all(strategy, vec(0, 0, 0), batch)

    np.testing.assert_allclose(result.weights, vec(1 / 3, 1, 2), rtol=1e-6)


def test_stale_update_is_down_weighted_in_magnitude_not_renormalised() -> None:
    strategy = FedBuff(buffer_size=2, staleness=PolynomialStaleness(a=1.0))
    batch = [
        contribution("a", vec(2, 2), staleness=0),
        contribution("b", vec(2, 2), staleness=1),  # s(1) = 0.5
    ]

    result = submit_all(strategy, vec(0, 0), batch)

    # (1·[2,2] + 0.5·[2,2]) / 2 = [1.5, 1.5]
    np.testing.assert_allclose(result.weights, vec(1.5, 1.5), rtol=1e-6)
    assert result.info["mean_staleness"] == 0.5
    assert result.info["max_staleness"] == 1.0


def test_a_stale_buffer_moves_the_model_less_than_a_fresh_one() -> None:
    weights = vec(0, 0, 0)
    fresh = FedBuff(buffer_size=2, staleness=PolynomialStaleness(a=0.5))
    stale = FedBuff(buffer_size=2, staleness=PolynomialStaleness(a=0.5))
    delta = vec(1, 2, 2)

    fresh_result = submit_all(fresh, weights, [contribution("a", delta), contribution("b", delta)])
    stale_result = submit_all(
        stale,
        weights,
        [contribution("a", delta, staleness=3), contribution("b", delta, staleness=3)],
    )

    assert l2_norm(stale_result.weights) < l2_norm(fresh_result.weights)
    assert l2_norm(stale_result.weights) == pytest.approx(1.5, rel=1e-6)  # 3 · 4^-0.5


def test_the_server_learning_rate_scales_the_step() -> None:
    strategy = FedBuff(buffer_size=1, staleness=ConstantStaleness(), optimizer=ServerSGD(lr=0.5))

    result = strategy.submit(vec(1, 1), contribution("a", vec(2, -4)), now=0.0)

    assert result is not None
    np.testing.assert_allclose(result.weights, vec(2, -1), rtol=1e-6)
    assert result.info["step_norm"] == pytest.approx(5**0.5, rel=1e-6)


def test_clipping_bounds_each_update_before_averaging() -> None:
    strategy = FedBuff(buffer_size=2, staleness=ConstantStaleness(), clip_norm=1.0)
    batch = [contribution("a", vec(3, 4)), contribution("b", vec(0, 0.5))]

    result = submit_all(strategy, vec(0, 0), batch)

    np.testing.assert_allclose(result.weights, vec(0.3, 0.65), rtol=1e-6)
    assert result.info["clip_fraction"] == 0.5


def test_updates_beyond_max_staleness_are_rejected_as_stale() -> None:
    strategy = FedBuff(max_staleness=4)

    assert strategy.admit(staleness=4, base_version=6, version=10) is None
    assert strategy.admit(staleness=5, base_version=5, version=10) == "stale"


def test_a_redelivered_update_id_already_pending_is_ignored() -> None:
    strategy = FedBuff(buffer_size=2, staleness=ConstantStaleness())
    weights = vec(0, 0)

    strategy.submit(weights, contribution("a", vec(1, 1)), now=0.0)
    again = strategy.submit(weights, contribution("a", vec(1, 1)), now=1.0)

    assert again is None
    assert strategy.pending() == ("a",)


def test_submit_never_mutates_the_weights_it_is_given() -> None:
    strategy = FedBuff(buffer_size=1, staleness=ConstantStaleness())
    weights = vec(1, 2)

    strategy.submit(weights, contribution("a", vec(5, 5)), now=0.0)

    np.testing.assert_array_equal(weights, vec(1, 2))


def test_state_dict_round_trip_continues_identically() -> None:
    # Given: two steps of FedBuff with server Adam
    def make() -> FedBuff:
        return FedBuff(buffer_size=1, staleness=ConstantStaleness(), optimizer=ServerAdam(lr=0.1))

    original = make()
    weights = vec(0, 0, 0)
    for i, delta in enumerate([vec(1, -2, 0), vec(3, 0, 1)]):
        result = original.submit(weights, contribution(f"u{i}", delta), now=0.0)
        assert result is not None
        weights = result.weights
    state = original.state_dict()

    # When: a fresh strategy loads the state and both take the same third step
    restored = make()
    restored.load_state_dict(state)
    third = contribution("u3", vec(-1, 1, 2))
    expected = original.submit(weights, third, now=0.0)
    actual = restored.submit(weights, third, now=0.0)

    # Then
    assert expected is not None and actual is not None
    np.testing.assert_array_equal(actual.weights, expected.weights)
    assert restored.steps == 3
    assert set(state) == {"strategy", "steps", "optimizer.kind", "optimizer.m", "optimizer.v"}
    assert all(isinstance(v, np.ndarray | int | float | str | list) for v in state.values())


def test_loading_a_checkpoint_empties_the_buffer() -> None:
    strategy = FedBuff(buffer_size=3)
    strategy.submit(vec(0, 0), contribution("a", vec(1, 1)), now=0.0)

    strategy.load_state_dict(FedBuff(buffer_size=3).state_dict())

    assert strategy.pending() == ()


def test_loading_the_state_of_another_strategy_is_refused() -> None:
    strategy = FedBuff()

    with pytest.raises(ValueError, match="'fedasync'"):
        strategy.load_state_dict({"strategy": "fedasync", "steps": 0})


def test_build_strategy_defaults_fedbuff_to_k_4_and_server_lr_1() -> None:
    strategy = build_strategy(StrategyConfig(name="fedbuff"))
    weights = vec(0, 0)

    results = [strategy.submit(weights, contribution(str(i), vec(i, 0)), now=0.0) for i in range(4)]

    assert isinstance(strategy, FedBuff)
    assert strategy.buffer_size == 4
    assert results[:3] == [None, None, None]
    final = results[3]
    assert final is not None
    np.testing.assert_allclose(final.weights, vec(1.5, 0), rtol=1e-6)  # mean of 0..3
