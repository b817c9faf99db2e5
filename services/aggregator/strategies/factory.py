"""Strategy configuration (part of the task spec) and the one place that builds a Strategy."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from services.aggregator.strategies.base import Strategy
from services.aggregator.strategies.fedasync import DEFAULT_ALPHA, FedAsync
from services.aggregator.strategies.fedavg import (
    DEFAULT_CLIENTS_PER_ROUND,
    DEFAULT_MIN_UPDATES,
    DEFAULT_ROUND_TIMEOUT_S,
    FedAvg,
)
from services.aggregator.strategies.fedbuff import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_TRIM_FRACTION,
    FedBuff,
)
from services.aggregator.strategies.privacy import GaussianAggregateNoise
from services.aggregator.strategies.server_optimizers import ServerOptimizer, server_optimizer
from services.aggregator.strategies.staleness import StalenessFunction, staleness_function


class StrategyConfig(BaseModel):
    """How the aggregator combines updates. Fields a strategy does not use are ignored by it.

    The defaults are robust ones (docs/security.md): FedBuff, uniform weights (a site's
    self-reported size weighs nothing; FedAvg weighs by size) and, for a buffered
    strategy, the trimmed mean (FedAsync, which applies updates one by one, the mean).
    Central DP is on when `dp_noise_multiplier` and `dp_clip_norm` are both set; it then defaults
    `staleness` to "constant" and the aggregator to the mean and refuses explicit
    settings that would change its sensitivity.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["fedasync", "fedbuff", "fedavg"] = "fedbuff"
    alpha: float = Field(default=DEFAULT_ALPHA, gt=0, le=1)
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    staleness_a: NonNegativeFloat = 0.5
    staleness_b: NonNegativeInt = 4
    buffer_size: PositiveInt = DEFAULT_BUFFER_SIZE
    sample_weighted: bool = False
    server_optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    server_lr: PositiveFloat = 1.0
    server_momentum: float = Field(default=0.9, ge=0, lt=1)
    server_beta2: float = Field(default=0.99, ge=0, lt=1)
    server_tau: PositiveFloat = 1e-3
    aggregator: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = Field(default=DEFAULT_TRIM_FRACTION, ge=0, lt=0.5)
    clip_norm: PositiveFloat | None = None
    max_staleness: NonNegativeInt | None = None
    clients_per_round: PositiveInt = DEFAULT_CLIENTS_PER_ROUND
    min_updates: PositiveInt = DEFAULT_MIN_UPDATES
    round_timeout: PositiveFloat = DEFAULT_ROUND_TIMEOUT_S
    dp_noise_multiplier: NonNegativeFloat | None = None
    dp_clip_norm: PositiveFloat | None = None
    seed: NonNegativeInt | None = None

    @property
    def dp(self) -> bool:
        """Whether central differential privacy is on."""
        return self.dp_noise_multiplier is not None

    @model_validator(mode="before")
    @classmethod
    def _dependent_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # Under DP, uniform weighting is the default rather than a trap to configure around.
        if data.get("dp_noise_multiplier") is not None:
            return {"staleness": "constant", "aggregator": "mean", "sample_weighted": False, **data}
        # A robust rule needs a buffer to choose from; FedAsync has none. FedAvg's rule for
        # whole local epochs weighs by size (capped at the join's size by the aggregator).
        name = data.get("name", "fedbuff")
        defaults = {
            "aggregator": "mean" if name == "fedasync" else "trimmed_mean",
            "sample_weighted": name == "fedavg",
        }
        return {**defaults, **data}

    @model_validator(mode="after")
    def _consistent(self) -> StrategyConfig:
        if (self.dp_noise_multiplier is None) != (self.dp_clip_norm is None):
            raise ValueError("set both dp_noise_multiplier and dp_clip_norm, or neither")
        if self.name == "fedavg" and self.min_updates > self.clients_per_round:
            raise ValueError(
                f"min_updates ({self.min_updates}) exceeds "
                f"clients_per_round ({self.clients_per_round})"
            )
        if self.name == "fedasync" and (self.dp or self.aggregator != "mean"):
            raise ValueError(
                "fedasync applies updates one by one: DP and robust aggregators "
                "need a buffered strategy (fedbuff or fedavg)"
            )
        if self.dp:
            _check_dp(self)
        return self


def build_strategy(config: StrategyConfig) -> Strategy:
    """The strategy `config` describes, with fresh state."""
    if config.name == "fedasync":
        return FedAsync(
            alpha=config.alpha,
            staleness=_staleness(config),
            clip_norm=config.clip_norm,
            max_staleness=config.max_staleness,
        )
    if config.name == "fedbuff":
        return FedBuff(
            buffer_size=config.buffer_size,
            staleness=_staleness(config),
            sample_weighted=config.sample_weighted,
            aggregator=config.aggregator,
            trim_fraction=config.trim_fraction,
            optimizer=_optimizer(config),
            privacy=_privacy(config),
            clip_norm=config.clip_norm,
            max_staleness=config.max_staleness,
        )
    return FedAvg(
        clients_per_round=config.clients_per_round,
        min_updates=config.min_updates,
        round_timeout=config.round_timeout,
        sample_weighted=config.sample_weighted,
        aggregator=config.aggregator,
        trim_fraction=config.trim_fraction,
        optimizer=_optimizer(config),
        privacy=_privacy(config),
        clip_norm=config.clip_norm,
    )


def _check_dp(config: StrategyConfig) -> None:
    if config.aggregator != "mean":
        raise ValueError(f"central DP needs aggregator 'mean', not {config.aggregator!r}")
    if config.sample_weighted:
        raise ValueError("central DP needs uniform weights: sample_weighted must be false")
    if config.name == "fedbuff" and config.staleness != "constant":
        raise ValueError(f"central DP needs staleness 'constant', not {config.staleness!r}")
    if config.clip_norm is not None:
        raise ValueError("central DP clips updates to dp_clip_norm: leave clip_norm unset")


def _staleness(config: StrategyConfig) -> StalenessFunction:
    if config.staleness == "constant":
        return staleness_function("constant")
    if config.staleness == "polynomial":
        return staleness_function("polynomial", a=config.staleness_a)
    return staleness_function("hinge", a=config.staleness_a, b=config.staleness_b)


def _optimizer(config: StrategyConfig) -> ServerOptimizer:
    return server_optimizer(
        config.server_optimizer,
        lr=config.server_lr,
        momentum=config.server_momentum,
        beta2=config.server_beta2,
        tau=config.server_tau,
    )


def _privacy(config: StrategyConfig) -> GaussianAggregateNoise | None:
    if config.dp_noise_multiplier is None or config.dp_clip_norm is None:
        return None
    return GaussianAggregateNoise(
        clip_norm=config.dp_clip_norm, noise_multiplier=config.dp_noise_multiplier
    )
