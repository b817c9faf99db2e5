"""FedAsync: x <- x + alpha · s(t) · delta, applied at once."""

from __future__ import annotations

import numpy as np
import pytest

from services.aggregator.strategies.base import Contribution, InadmissibleContribution
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.strategies.fedasync import FedAsync
from services.aggregator.strategies.robust import l2_norm
from services.aggregator.strategies.staleness import ConstantStaleness, PolynomialStaleness


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def contribution(delta: np.ndarray, *, staleness: int = 0, uid: str = "u1") -> Contribution:
    return Contribution(
        update_id=uid,
        trainer_id="t1",
        delta=delta,
        num_examples=10,
        staleness=staleness,
        base_version=5,
    )


def test_a_fresh_update_moves_the_model_by_alpha_times_delta() -> None:
    # Given
    strategy = FedAsync(alpha=0.5, staleness=PolynomialStaleness(a=0.5))
    weights = vec(1, 2, 3, 4)

    # When
    result = strategy.submit(weights, contribution(vec(1, -1, 2, 0)), now=0.0)

    # Then
    np.testing.assert_allclose(result.weights, vec(1.5, 1.5, 4, 4), rtol=1e-6)
    assert result.applied == ("u1",)
    assert result.info["mixing_weight"] == pytest.approx(0.5)


def test_stale_update_is_down_weighted_by_polynomial_staleness() -> None:
    strategy = FedAsync(alpha=0.5, staleness=PolynomialStaleness(a=0.5))
    weights = vec(1, 2, 3, 4)

    result = strategy.submit(weights, contribution(vec(1, -1, 2, 0), staleness=3), now=0.0)

    # s(3) = 4^-0.5 = 0.5, so the mixing weight is 0.25.
    np.testing.assert_allclose(result.weights, vec(1.25, 1.75, 3.5, 4), rtol=1e-6)
    assert result.info["mean_staleness"] == 3.0


def test_a_stale_update_moves_the_model_less_than_a_fresh_one() -> None:
    strategy = FedAsync(alpha=0.6, staleness=PolynomialStaleness(a=0.5))
    weights = vec(0, 0, 0)
    delta = vec(1, 2, 2)

    fresh = strategy.submit(weights, contribution(delta, staleness=0), now=0.0)
    stale = strategy.submit(weights, contribution(delta, staleness=8, uid="u2"), now=0.0)

    assert l2_norm(stale.weights - weights) < l2_norm(fresh.weights - weights)
    assert l2_norm(stale.weights) == pytest.approx(0.6 * 3 / 3, rel=1e-6)


def test_submit_never_mutates_the_weights_it_is_given() -> None:
    strategy = FedAsync(alpha=1.0, staleness=ConstantStaleness())
    weights = vec(1, 2, 3)

    result = strategy.submit(weights, contribution(vec(1, 1, 1)), now=0.0)

    np.testing.assert_array_equal(weights, vec(1, 2, 3))
    assert not np.shares_memory(result.weights, weights)


def test_clipping_bounds_the_norm_of_the_applied_delta() -> None:
    strategy = FedAsync(alpha=1.0, staleness=ConstantStaleness(), clip_norm=1.0)
    weights = vec(0, 0, 0)

    result = strategy.submit(weights, contribution(vec(3, 4, 0)), now=0.0)

    np.testing.assert_allclose(result.weights, vec(0.6, 0.8, 0), rtol=1e-6)
    assert result.info["clip_fraction"] == 1.0


def test_updates_beyond_max_staleness_are_rejected_as_stale() -> None:
    strategy = FedAsync(max_staleness=2)

    assert strategy.admit(staleness=2, base_version=3, version=5) is None
    assert strategy.admit(staleness=3, base_version=2, version=5) == "stale"
    with pytest.raises(InadmissibleContribution) as caught:
        strategy.submit(vec(0, 0), contribution(vec(1, 1), staleness=3), now=0.0)
    assert caught.value.reason == "stale"


def test_an_update_from_a_future_version_is_rejected() -> None:
    strategy = FedAsync()

    assert strategy.admit(staleness=0, base_version=6, version=5) == "future-version"


def test_a_delta_of_the_wrong_size_is_refused() -> None:
    strategy = FedAsync()

    with pytest.raises(ValueError, match="does not match"):
        strategy.submit(vec(0, 0, 0), contribution(vec(1, 1)), now=0.0)


def test_state_dict_round_trip_keeps_the_step_count() -> None:
    strategy = FedAsync()
    strategy.submit(vec(0, 0), contribution(vec(1, 1)), now=0.0)

    restored = FedAsync()
    restored.load_state_dict(strategy.state_dict())

    assert restored.steps == 1
    assert restored.pending() == ()
    assert restored.buffer_size == 1


def test_build_strategy_gives_fedasync_alpha_0_6_and_polynomial_0_5_by_default() -> None:
    strategy = build_strategy(StrategyConfig(name="fedasync"))

    result = strategy.submit(vec(0, 0), contribution(vec(1, 1), staleness=3), now=0.0)

    assert isinstance(strategy, FedAsync)
    assert result is not None
    np.testing.assert_allclose(result.weights, vec(0.3, 0.3), rtol=1e-6)  # 0.6 · 4^-0.5


def test_fedasync_config_refuses_robust_aggregators_and_dp() -> None:
    with pytest.raises(ValueError, match="buffered strategy"):
        StrategyConfig(name="fedasync", aggregator="median")
    with pytest.raises(ValueError, match="buffered strategy"):
        StrategyConfig(name="fedasync", dp_noise_multiplier=1.0, dp_clip_norm=1.0)
