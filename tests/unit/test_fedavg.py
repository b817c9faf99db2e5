"""FedAvg with a round barrier: closes on a full round or on timeout with enough updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.aggregator.strategies.base import Contribution, InadmissibleContribution
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.strategies.fedavg import FedAvg
from services.aggregator.strategies.server_optimizers import ServerMomentum

ROUND = 7


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def contribution(
    trainer: str, delta: np.ndarray, *, n: int = 1, staleness: int = 0, uid: str | None = None
) -> Contribution:
    return Contribution(
        update_id=uid or f"{trainer}-update",
        trainer_id=trainer,
        delta=delta,
        num_examples=n,
        staleness=staleness,
        base_version=ROUND - staleness,
    )


def make(**kwargs: object) -> FedAvg:
    options: dict[str, object] = {"clients_per_round": 3, "min_updates": 2, "round_timeout": 10.0}
    options.update(kwargs)
    return FedAvg(**options)  # type: ignore[arg-type]


def test_round_closes_as_soon_as_clients_per_round_updates_arrived() -> None:
    # Given
    strategy = make()
    weights = vec(1, 1)

    # When
    a = strategy.submit(weights, contribution("a", vec(3, 0), n=1), now=0.0)
    b = strategy.submit(weights, contribution("b", vec(0, 3), n=1), now=1.0)
    c = strategy.submit(weights, contribution("c", vec(3, 3), n=4), now=2.0)

    # Then: classic FedAvg, x + Σ n_i d_i / Σ n_i = [1, 1] + [15, 15] / 6
    assert a is None and b is None
    assert c is not None
    assert c.applied == ("a-update", "b-update", "c-update")
    np.testing.assert_allclose(c.weights, vec(3.5, 3.5), rtol=1e-6)


def test_round_closes_on_timeout_once_min_updates_arrived() -> None:
    strategy = make()
    weights = vec(0, 0)
    strategy.submit(weights, contribution("a", vec(2, 0)), now=0.0)
    strategy.submit(weights, contribution("b", vec(0, 2)), now=1.0)

    early = strategy.poll(weights, now=9.9)
    on_time = strategy.poll(weights, now=10.0)

    assert early is None
    assert on_time is not None
    assert on_time.applied == ("a-update", "b-update")
    np.testing.assert_allclose(on_time.weights, vec(1, 1), rtol=1e-6)


def test_round_does_not_close_on_timeout_with_fewer_than_min_updates() -> None:
    strategy = make()
    weights = vec(0, 0)
    strategy.submit(weights, contribution("a", vec(2, 0)), now=0.0)

    late_poll = strategy.poll(weights, now=100.0)
    late_second = strategy.submit(weights, contribution("b", vec(0, 2)), now=101.0)

    assert late_poll is None
    assert strategy.pending() == ()
    assert late_second is not None
    np.testing.assert_allclose(late_second.weights, vec(1, 1), rtol=1e-6)


def test_the_next_round_opens_when_the_previous_one_closes() -> None:
    strategy = make()
    weights = vec(0, 0)
    strategy.submit(weights, contribution("a", vec(2, 0)), now=0.0)
    strategy.submit(weights, contribution("b", vec(0, 2)), now=1.0)
    closed = strategy.poll(weights, now=10.0)
    assert closed is not None

    next_round = ROUND + 1
    for trainer in ("a", "b"):
        strategy.submit(
            closed.weights,
            Contribution(f"{trainer}2", trainer, vec(1, 1), 1, 0, next_round),
            now=12.0,
        )

    assert strategy.round_opened_at == 10.0
    assert strategy.poll(closed.weights, now=19.9) is None
    assert strategy.poll(closed.weights, now=20.0) is not None


def test_poll_before_any_update_only_opens_the_round() -> None:
    strategy = make()

    result = strategy.poll(vec(0, 0), now=5.0)

    assert result is None
    assert strategy.round_opened_at == 5.0


def test_updates_from_an_earlier_round_are_rejected_as_old_round() -> None:
    strategy = make()

    assert strategy.admit(staleness=1, base_version=ROUND - 1, version=ROUND) == "old-round"
    assert strategy.admit(staleness=0, base_version=ROUND, version=ROUND) is None
    with pytest.raises(InadmissibleContribution) as caught:
        strategy.submit(vec(0, 0), contribution("a", vec(1, 1), staleness=1), now=0.0)
    assert caught.value.reason == "old-round"


def test_a_second_update_from_the_same_trainer_in_a_round_is_rejected() -> None:
    strategy = make()
    weights = vec(0, 0)
    strategy.submit(weights, contribution("a", vec(1, 1)), now=0.0)

    same = strategy.admit(staleness=0, base_version=ROUND, version=ROUND, trainer_id="a")
    other = strategy.admit(staleness=0, base_version=ROUND, version=ROUND, trainer_id="b")

    assert same == "duplicate-in-round"
    assert other is None
    with pytest.raises(InadmissibleContribution, match="duplicate-in-round"):
        strategy.submit(weights, contribution("a", vec(1, 1), uid="a-second"), now=1.0)
    assert strategy.pending() == ("a-update",)


def test_a_trainer_may_contribute_again_in_the_next_round() -> None:
    strategy = make(clients_per_round=1, min_updates=1)
    strategy.submit(vec(0, 0), contribution("a", vec(1, 1)), now=0.0)

    reason = strategy.admit(staleness=0, base_version=ROUND + 1, version=ROUND + 1, trainer_id="a")

    assert reason is None


def test_server_momentum_turns_fedavg_into_fedavgm() -> None:
    strategy = make(clients_per_round=1, min_updates=1, optimizer=ServerMomentum(lr=1.0, beta=0.5))

    first = strategy.submit(vec(0, 0), contribution("a", vec(2, 0)), now=0.0)
    assert first is not None
    second = strategy.submit(
        first.weights, Contribution("b1", "b", vec(0, 2), 1, 0, ROUND + 1), now=1.0
    )

    # m1 = [2, 0]; x1 = [2, 0]; m2 = 0.5·[2, 0] + [0, 2] = [1, 2]; x2 = [3, 2]
    assert second is not None
    np.testing.assert_allclose(second.weights, vec(3, 2), rtol=1e-6)


def test_state_dict_round_trip_keeps_the_round_opening_time() -> None:
    strategy = make()
    strategy.poll(vec(0, 0), now=3.0)

    restored = make()
    restored.load_state_dict(strategy.state_dict())

    assert restored.round_opened_at == 3.0
    assert math.isnan(float(make().state_dict()["round_opened_at"]))  # type: ignore[arg-type]


def test_min_updates_above_clients_per_round_is_refused() -> None:
    with pytest.raises(ValueError, match="min_updates"):
        make(clients_per_round=2, min_updates=3)
    with pytest.raises(ValueError, match="min_updates"):
        StrategyConfig(name="fedavg", clients_per_round=2, min_updates=3)


def test_build_strategy_defaults_fedavg_to_4_clients_2_minimum_and_600_seconds() -> None:
    strategy = build_strategy(StrategyConfig(name="fedavg"))
    weights = vec(0, 0)
    strategy.submit(weights, contribution("a", vec(2, 0)), now=0.0)
    strategy.submit(weights, contribution("b", vec(0, 2)), now=1.0)

    assert isinstance(strategy, FedAvg)
    assert strategy.buffer_size == 4
    assert strategy.poll(weights, now=599.0) is None
    result = strategy.poll(weights, now=600.0)
    assert result is not None
    np.testing.assert_allclose(result.weights, vec(1, 1), rtol=1e-6)
