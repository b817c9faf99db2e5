"""Central DP for buffered strategies: clip, sum, Gaussian noise z·C, fixed denominator K."""

from __future__ import annotations

import numpy as np
import pytest

from services.aggregator.strategies.base import Contribution
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.strategies.fedavg import FedAvg
from services.aggregator.strategies.fedbuff import FedBuff
from services.aggregator.strategies.privacy import GaussianAggregateNoise
from services.aggregator.strategies.staleness import ConstantStaleness, PolynomialStaleness

SIZE = 2_000


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def contribution(uid: str, delta: np.ndarray, *, n: int = 1) -> Contribution:
    return Contribution(uid, f"trainer-{uid}", delta, n, 0, 0)


def dp_fedbuff(*, k: int, clip: float, z: float) -> FedBuff:
    privacy = GaussianAggregateNoise(clip_norm=clip, noise_multiplier=z)
    return FedBuff(
        buffer_size=k, staleness=ConstantStaleness(), sample_weighted=False, privacy=privacy
    )


def test_noise_std_on_zero_updates_is_z_times_c_over_k() -> None:
    # Given: K = 4, C = 2, z = 1.5, so the released mean has std 0.75 per coordinate
    strategy = dp_fedbuff(k=4, clip=2.0, z=1.5)
    zeros = np.zeros(SIZE, dtype=np.float32)

    # When: 25 steps of all-zero updates from zero weights
    samples = []
    for step in range(25):
        for i in range(4):
            result = strategy.submit(zeros, contribution(f"{step}-{i}", zeros), now=0.0)
        assert result is not None
        samples.append(result.weights)
    noise = np.concatenate(samples)

    # Then
    assert result is not None
    assert float(noise.std()) == pytest.approx(0.75, rel=0.05)
    assert abs(float(noise.mean())) < 0.02
    assert result.info["dp_noise_std"] == pytest.approx(0.75)
    assert result.info["dp_steps"] == 25.0


def test_each_update_is_clipped_to_c_and_the_sum_divided_by_k() -> None:
    privacy = GaussianAggregateNoise(clip_norm=1.0, noise_multiplier=0.0)

    result = privacy.aggregate([vec(3, 4, 0), vec(0, 0, 0.5)], denominator=2)

    np.testing.assert_allclose(result.delta, vec(0.3, 0.4, 0.25), rtol=1e-6)
    assert result.clipped == 1
    assert privacy.steps == 1


def test_the_denominator_stays_the_buffer_size_when_a_round_closes_short() -> None:
    privacy = GaussianAggregateNoise(clip_norm=10.0, noise_multiplier=0.0)
    strategy = FedAvg(
        clients_per_round=4,
        min_updates=2,
        round_timeout=5.0,
        sample_weighted=False,
        privacy=privacy,
    )
    weights = vec(0, 0)
    strategy.submit(weights, contribution("a", vec(4, 0)), now=0.0)
    strategy.submit(weights, contribution("b", vec(0, 4)), now=0.0)

    result = strategy.poll(weights, now=5.0)

    assert result is not None
    np.testing.assert_allclose(result.weights, vec(1, 1), rtol=1e-6)  # [4, 4] / 4, not / 2


def test_a_release_after_a_restore_carries_fresh_noise_and_counts_on() -> None:
    # Given: two DP FedBuff steps, then a checkpoint of the strategy
    original = dp_fedbuff(k=1, clip=1.0, z=1.0)
    weights = np.zeros(4096, dtype=np.float32)
    for i in range(2):
        result = original.submit(weights, contribution(f"u{i}", weights), now=0.0)
        assert result is not None
        weights = result.weights
    state = original.state_dict()

    # When: the same next step is released by the original and by a restored copy
    restored = dp_fedbuff(k=1, clip=1.0, z=1.0)
    restored.load_state_dict(state)
    first = original.submit(weights, contribution("u2", weights), now=0.0)
    again = restored.submit(weights, contribution("u2", weights), now=0.0)

    # Then: the noise is independent (the difference has std sqrt(2)), not replayed,
    # and the restored copy counts the release as the third
    assert first is not None and again is not None
    difference = first.weights - again.weights
    assert float(np.median(np.abs(difference))) > 0.5
    assert float(difference.std()) == pytest.approx(np.sqrt(2), rel=0.1)
    assert restored.state_dict()["privacy.steps"] == 3
    assert "privacy.seed" not in state


def test_the_release_count_never_goes_back() -> None:
    noise = GaussianAggregateNoise(clip_norm=1.0, noise_multiplier=1.0)
    noise.advance_to(5)
    noise.load_state_dict({"steps": 2, "seed": 42})
    noise.advance_to(3)
    assert noise.steps == 5


def test_each_release_asks_the_source_for_a_new_generator() -> None:
    calls: list[int] = []

    def source() -> np.random.Generator:
        calls.append(1)
        return np.random.default_rng(len(calls))

    noise = GaussianAggregateNoise(clip_norm=1.0, noise_multiplier=1.0, source=source)
    zeros = [np.zeros(8, dtype=np.float32)]
    first = noise.aggregate(zeros, denominator=1).delta
    second = noise.aggregate(zeros, denominator=1).delta
    assert len(calls) == 2 and not np.array_equal(first, second)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aggregator": "median"}, "mean aggregator"),
        ({"aggregator": "trimmed_mean"}, "mean aggregator"),
        ({"sample_weighted": True}, "uniform weights"),
        ({"staleness": PolynomialStaleness(a=0.5)}, "constant staleness"),
        ({"clip_norm": 1.0}, "clip_norm"),
    ],
)
def test_dp_with_weighting_or_robust_aggregation_is_refused(
    options: dict[str, object], message: str
) -> None:
    kwargs: dict[str, object] = {
        "buffer_size": 2,
        "staleness": ConstantStaleness(),
        "sample_weighted": False,
        "privacy": GaussianAggregateNoise(clip_norm=1.0, noise_multiplier=1.0),
    }
    kwargs.update(options)

    with pytest.raises(ValueError, match=message):
        FedBuff(**kwargs)  # type: ignore[arg-type]


def test_dp_config_defaults_to_uniform_weights_and_builds() -> None:
    config = StrategyConfig(name="fedbuff", dp_noise_multiplier=1.0, dp_clip_norm=0.5, seed=3)

    strategy = build_strategy(config)

    assert config.staleness == "constant"
    assert config.sample_weighted is False
    assert isinstance(strategy, FedBuff)
    assert strategy.privacy is not None and "seed" not in strategy.privacy.state_dict()


@pytest.mark.parametrize(
    "options",
    [
        {"staleness": "polynomial"},
        {"sample_weighted": True},
        {"aggregator": "median"},
        {"clip_norm": 1.0},
        {"dp_clip_norm": None},
    ],
)
def test_dp_config_refuses_settings_that_change_its_sensitivity(options: dict[str, object]) -> None:
    fields: dict[str, object] = {"name": "fedbuff", "dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0}
    fields.update(options)

    with pytest.raises(ValueError, match=r"DP|dp_"):
        StrategyConfig(**fields)
