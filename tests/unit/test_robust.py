"""Robust aggregation: weighted mean, coordinate median, trimmed mean, L2 clipping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from services.aggregator.strategies.base import Contribution
from services.aggregator.strategies.fedbuff import FedBuff
from services.aggregator.strategies.robust import (
    clip_l2,
    coordinate_median,
    l2_norm,
    trimmed_mean,
    weighted_mean,
    weighted_sum,
)
from services.aggregator.strategies.staleness import ConstantStaleness, PolynomialStaleness

OUTLIER = 1e6


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def honest_and_one_outlier() -> list[np.ndarray]:
    return [vec(1, 2, 3), vec(1, 2, 3), vec(1, 2, 3), vec(1, 2, 3), vec(OUTLIER, OUTLIER, -OUTLIER)]


def test_weighted_mean_weighs_each_delta_by_its_share() -> None:
    result = weighted_mean([vec(1, 2), vec(3, 6)], [1.0, 3.0])

    np.testing.assert_allclose(result, vec(2.5, 5), rtol=1e-6)


def test_coordinate_median_takes_the_middle_value_of_each_coordinate() -> None:
    odd = coordinate_median([vec(1, 5), vec(2, 6), vec(3, 100)])
    even = coordinate_median([vec(1), vec(2), vec(3), vec(10)])

    np.testing.assert_array_equal(odd, vec(2, 6))
    np.testing.assert_array_equal(even, vec(2.5))


def test_trimmed_mean_drops_floor_beta_k_values_from_each_side() -> None:
    deltas = [vec(1, -5), vec(2, 0), vec(3, 1), vec(4, 2), vec(100, 3)]

    trimmed = trimmed_mean(deltas, 0.2)  # ⌊0.2·5⌋ = 1 per side
    untrimmed = trimmed_mean(deltas, 0.1)  # ⌊0.1·5⌋ = 0: plain mean

    np.testing.assert_allclose(trimmed, vec(3, 1), rtol=1e-6)
    np.testing.assert_allclose(untrimmed, vec(22, 0.2), rtol=1e-6)


def test_median_and_trimmed_mean_resist_one_outlier_while_the_mean_does_not() -> None:
    deltas = honest_and_one_outlier()

    mean = weighted_mean(deltas, [1.0] * 5)
    median = coordinate_median(deltas)
    trimmed = trimmed_mean(deltas, 0.2)

    np.testing.assert_allclose(median, vec(1, 2, 3), rtol=1e-6)
    np.testing.assert_allclose(trimmed, vec(1, 2, 3), rtol=1e-6)
    assert mean[0] == pytest.approx((4 + OUTLIER) / 5, rel=1e-6)


def test_fedbuff_with_the_median_aggregator_resists_an_outlier() -> None:
    strategy = FedBuff(buffer_size=5, staleness=ConstantStaleness(), aggregator="median")
    weights = vec(0, 0, 0)
    results = [
        strategy.submit(weights, Contribution(f"u{i}", f"t{i}", d, 1, 0, 0), now=0.0)
        for i, d in enumerate(honest_and_one_outlier())
    ]

    final = results[-1]
    assert final is not None
    np.testing.assert_allclose(final.weights, vec(1, 2, 3), rtol=1e-6)


def test_robust_aggregators_scale_each_delta_by_its_staleness_first() -> None:
    strategy = FedBuff(
        buffer_size=3,
        staleness=PolynomialStaleness(a=1.0),
        aggregator="trimmed_mean",
        trim_fraction=0.34,
    )
    weights = vec(0)
    batch = [(vec(4), 0), (vec(4), 1), (vec(4), 3)]  # scaled: 4, 2, 1
    results = [
        strategy.submit(weights, Contribution(f"u{i}", f"t{i}", d, 1, t, 0), now=0.0)
        for i, (d, t) in enumerate(batch)
    ]

    final = results[-1]
    assert final is not None
    np.testing.assert_allclose(final.weights, vec(2), rtol=1e-6)


def test_clip_l2_bounds_the_norm_and_keeps_the_direction() -> None:
    delta = vec(3, 4, 0)

    clipped = clip_l2(delta, 1.0)

    np.testing.assert_allclose(clipped, vec(0.6, 0.8, 0), rtol=1e-6)
    np.testing.assert_array_equal(delta, vec(3, 4, 0))


def test_clip_l2_leaves_a_short_delta_unchanged() -> None:
    delta = vec(0.3, 0.4)

    clipped = clip_l2(delta, 1.0)

    np.testing.assert_array_equal(clipped, delta)
    with pytest.raises(ValueError, match="max_norm"):
        clip_l2(delta, 0.0)


def test_l2_norm_of_huge_values_does_not_overflow() -> None:
    assert l2_norm(vec(3e30, 4e30)) == pytest.approx(5e30, rel=1e-6)


finite = st.floats(min_value=-1e3, max_value=1e3, width=32)


@given(
    delta=arrays(np.float32, st.integers(1, 6), elements=finite),
    weights=st.lists(st.floats(min_value=0.1, max_value=100), min_size=1, max_size=5),
)
def test_weighted_mean_of_identical_deltas_is_that_delta(
    delta: np.ndarray, weights: list[float]
) -> None:
    result = weighted_mean([delta] * len(weights), weights)

    np.testing.assert_allclose(result, delta, rtol=1e-5, atol=1e-4)


@given(
    stacked=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 4)), elements=finite),
    seed=st.integers(0, 2**32 - 1),
)
def test_median_and_trimmed_mean_are_permutation_invariant(stacked: np.ndarray, seed: int) -> None:
    deltas = list(stacked)
    shuffled = [deltas[i] for i in np.random.default_rng(seed).permutation(len(deltas))]

    np.testing.assert_array_equal(coordinate_median(shuffled), coordinate_median(deltas))
    np.testing.assert_allclose(
        trimmed_mean(shuffled, 0.25), trimmed_mean(deltas, 0.25), rtol=1e-6, atol=1e-6
    )


@given(
    stacked=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 4)), elements=finite),
    beta=st.floats(min_value=0, max_value=0.49),
)
def test_robust_statistics_stay_within_the_range_of_each_coordinate(
    stacked: np.ndarray, beta: float
) -> None:
    low, high = stacked.min(axis=0), stacked.max(axis=0)

    for result in (coordinate_median(list(stacked)), trimmed_mean(list(stacked), beta)):
        assert np.all(result >= low - 1e-3)
        assert np.all(result <= high + 1e-3)


@given(
    delta=arrays(np.float32, st.integers(1, 6), elements=finite),
    max_norm=st.floats(min_value=1e-3, max_value=1e3),
)
def test_clipped_norm_never_exceeds_the_bound(delta: np.ndarray, max_norm: float) -> None:
    assert l2_norm(clip_l2(delta, max_norm)) <= max_norm * (1 + 1e-6)


def test_l2_norm_of_a_model_sized_vector_matches_a_float64_reference() -> None:
    rng = np.random.default_rng(0)
    delta = rng.standard_normal(3_000_000).astype(np.float32)
    wide = delta.astype(np.float64)
    assert l2_norm(delta) == pytest.approx(float(np.sqrt(wide @ wide)), rel=1e-6)


def test_l2_norm_of_nan_is_nan() -> None:
    assert np.isnan(l2_norm(vec(1, float("nan"))))


def test_weighted_sum_of_huge_finite_deltas_with_convex_coefficients_stays_finite() -> None:
    big = np.float32(3e38)
    total = weighted_sum([vec(big, -big), vec(big, -big)], [0.5, 0.5])
    assert total.dtype == np.float32
    assert np.isfinite(total).all()
    np.testing.assert_allclose(total, vec(big, -big), rtol=1e-6)


def test_weighted_sum_matches_a_float64_reference() -> None:
    rng = np.random.default_rng(1)
    deltas = [rng.standard_normal(10_000).astype(np.float32) for _ in range(8)]
    coefficients = list(rng.uniform(0, 0.25, size=8))
    reference = sum(c * d.astype(np.float64) for c, d in zip(coefficients, deltas, strict=True))
    np.testing.assert_allclose(weighted_sum(deltas, coefficients), reference, rtol=1e-5, atol=1e-6)


def test_weighted_sum_refuses_a_coefficient_count_that_does_not_match() -> None:
    with pytest.raises(ValueError, match="coefficients"):
        weighted_sum([vec(1, 2)], [0.5, 0.5])
