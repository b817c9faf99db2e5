"""Staleness functions s(t): constant, polynomial (1+t)^-a, hinge."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.aggregator.strategies.staleness import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    staleness_function,
)


@pytest.mark.parametrize("t", [0, 1, 3, 100])
def test_constant_staleness_counts_every_update_fully(t: int) -> None:
    assert ConstantStaleness()(t) == 1.0


@pytest.mark.parametrize(
    ("a", "t", "expected"),
    [(0.5, 0, 1.0), (0.5, 3, 0.5), (0.5, 8, 1 / 3), (1.0, 1, 0.5), (2.0, 3, 1 / 16)],
)
def test_polynomial_staleness_is_one_plus_t_to_the_minus_a(
    a: float, t: int, expected: float
) -> None:
    assert PolynomialStaleness(a=a)(t) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("t", "expected"), [(0, 1.0), (2, 1.0), (3, 1 / 1.5), (4, 0.5), (8, 0.25)])
def test_hinge_staleness_is_flat_up_to_b_then_decays(t: int, expected: float) -> None:
    assert HingeStaleness(a=0.5, b=2)(t) == pytest.approx(expected, rel=1e-12)


def test_negative_staleness_is_a_bug_and_raises() -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        PolynomialStaleness(a=0.5)(-1)


def test_staleness_function_builds_each_kind_by_name() -> None:
    polynomial = staleness_function("polynomial", a=1.0)
    hinge = staleness_function("hinge", a=1.0, b=1)

    assert staleness_function("constant")(5) == 1.0
    assert polynomial(3) == pytest.approx(0.25)
    assert hinge(3) == pytest.approx(1 / 3)
    assert (polynomial.name, hinge.name) == ("polynomial", "hinge")


def test_staleness_function_refuses_unknown_names_and_parameters() -> None:
    with pytest.raises(ValueError, match="unknown staleness"):
        staleness_function("linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no parameter"):
        staleness_function("constant", a=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        staleness_function("polynomial", a=-1.0)


@given(
    name=st.sampled_from(["constant", "polynomial", "hinge"]),
    a=st.floats(min_value=0, max_value=10),
    t=st.integers(min_value=0, max_value=10_000),
)
def test_every_staleness_function_is_in_zero_one_and_non_increasing(
    name: str, a: float, t: int
) -> None:
    params = {} if name == "constant" else {"a": a}
    s = staleness_function(name, **params)  # type: ignore[arg-type]

    assert 0 < s(t + 1) <= s(t) <= 1.0
    assert s(0) == 1.0
