"""Server optimizers: plain SGD, momentum (FedAvgM) and FedAdam without bias correction."""

from __future__ import annotations

import numpy as np
import pytest

from services.aggregator.strategies.server_optimizers import (
    ServerAdam,
    ServerMomentum,
    ServerSGD,
    server_optimizer,
)


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_server_sgd_adds_lr_times_the_delta() -> None:
    result = ServerSGD(lr=0.5).step(vec(1, 2, 3), vec(1, 1, -2))

    np.testing.assert_allclose(result, vec(1.5, 2.5, 2), rtol=1e-6)


def test_server_momentum_accumulates_over_two_steps() -> None:
    # Given
    optimizer = ServerMomentum(lr=0.5, beta=0.9)

    # When
    x1 = optimizer.step(vec(0, 0, 0), vec(1, 2, -1))
    x2 = optimizer.step(x1, vec(1, 0, 1))

    # Then: m1 = g1, x1 = 0.5·g1; m2 = 0.9·g1 + g2 = [1.9, 1.8, 0.1]; x2 = x1 + 0.5·m2
    np.testing.assert_allclose(x1, vec(0.5, 1, -0.5), rtol=1e-6)
    np.testing.assert_allclose(x2, vec(1.45, 1.9, -0.45), rtol=1e-6)


def test_server_adam_matches_hand_computed_moments_over_two_steps() -> None:
    optimizer = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)

    x1 = optimizer.step(vec(0, 0, 0), vec(1, -2, 0))
    x2 = optimizer.step(x1, vec(3, 0, 1))

    # Step 1: m = [0.1, -0.2, 0], v = [0.01, 0.04, 0], sqrt(v) = [0.1, 0.2, 0]
    expected_x1 = vec(0.01 / 0.101, -0.02 / 0.201, 0)
    # Step 2: m = 0.9·m + 0.1·g = [0.39, -0.18, 0.1]; v = 0.99·v + 0.01·g² = [0.0999, 0.0396, 0.01]
    m2 = np.array([0.39, -0.18, 0.1])
    v2 = np.array([0.0999, 0.0396, 0.01])
    expected_x2 = expected_x1 + 0.1 * m2 / (np.sqrt(v2) + 1e-3)
    np.testing.assert_allclose(x1, expected_x1, rtol=1e-5)
    np.testing.assert_allclose(x2, expected_x2, rtol=1e-5)
    assert x2[2] == pytest.approx(0.1 * 0.1 / 0.101, rel=1e-5)


def test_optimizers_never_mutate_the_weights_they_are_given() -> None:
    weights = vec(1, 2)

    for optimizer in (ServerSGD(lr=1.0), ServerMomentum(lr=1.0), ServerAdam(lr=1.0)):
        optimizer.step(weights, vec(1, 1))

    np.testing.assert_array_equal(weights, vec(1, 2))


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    original = server_optimizer(name, lr=0.1)  # type: ignore[arg-type]
    x1 = original.step(vec(0, 0, 0), vec(1, -2, 0.5))
    state = original.state_dict()

    restored = server_optimizer(name, lr=0.1)  # type: ignore[arg-type]
    restored.load_state_dict(state)
    expected = original.step(x1, vec(3, 0, 1))
    actual = restored.step(x1, vec(3, 0, 1))

    np.testing.assert_array_equal(actual, expected)
    assert not np.array_equal(actual, ServerSGD(lr=0.1).step(x1, vec(3, 0, 1)))


def test_moments_before_the_first_step_are_saved_as_empty_arrays() -> None:
    state = ServerAdam(lr=0.1).state_dict()

    assert state["kind"] == "adam"
    assert isinstance(state["m"], np.ndarray) and state["m"].size == 0
    assert isinstance(state["v"], np.ndarray) and state["v"].size == 0


def test_loading_the_state_of_another_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="'momentum'"):
        ServerAdam(lr=0.1).load_state_dict(ServerMomentum(lr=0.1).state_dict())


def test_invalid_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError, match="learning rate"):
        ServerSGD(lr=0.0)
    with pytest.raises(ValueError, match="beta"):
        ServerMomentum(lr=1.0, beta=1.0)
    with pytest.raises(ValueError, match="tau"):
        ServerAdam(lr=1.0, tau=0.0)
