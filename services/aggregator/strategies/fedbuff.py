"""FedBuff (Nguyen et al. 2022): buffer K updates, combine them, take one server step.

Mean: Σ s(t_i)·n_i·d_i / Σ n_i (staleness shrinks a stale update's magnitude, sample counts
weigh it). Median / trimmed mean: each d_i is scaled by s(t_i), then the robust statistic.
`BufferedStrategy` is the shared buffer → clip → combine → server-step pipeline that the
FedAvg round barrier reuses.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from services.aggregator.strategies.base import (
    Contribution,
    FloatVector,
    StateDict,
    StepResult,
    Strategy,
    check_delta,
)
from services.aggregator.strategies.privacy import GaussianAggregateNoise
from services.aggregator.strategies.robust import (
    AggregatorName,
    clip_l2,
    coordinate_median,
    l2_norm,
    trimmed_mean,
    weighted_sum,
)
from services.aggregator.strategies.server_optimizers import ServerOptimizer, ServerSGD
from services.aggregator.strategies.staleness import (
    ConstantStaleness,
    PolynomialStaleness,
    StalenessFunction,
)

DEFAULT_BUFFER_SIZE = 4
"""K: updates per server step (the FedBuff paper finds K around 10 works; 4 suits small runs)."""

DEFAULT_TRIM_FRACTION = 0.25
"""Fraction of values trimmed from each side per coordinate by the trimmed mean: one per
side at the default K=4 (0.1 would trim nothing below K=10)."""


class BufferedStrategy(Strategy):
    """Collects contributions and, when `_due`, folds them into one server-optimizer step.

    With `privacy`, updates are clipped to its norm and averaged uniformly with noise over
    a fixed denominator (`buffer_size`); staleness and sample weighting would change the
    sensitivity, so they must be off and the aggregator must be the mean.
    """

    def __init__(
        self,
        *,
        buffer_size: int,
        staleness: StalenessFunction,
        sample_weighted: bool,
        aggregator: AggregatorName,
        trim_fraction: float,
        optimizer: ServerOptimizer | None,
        privacy: GaussianAggregateNoise | None,
        clip_norm: float | None,
        max_staleness: int | None,
    ) -> None:
        super().__init__(clip_norm=clip_norm, max_staleness=max_staleness)
        if buffer_size < 1:
            raise ValueError(f"buffer size must be >= 1, got {buffer_size}")
        if aggregator not in ("mean", "median", "trimmed_mean"):
            raise ValueError(f"unknown aggregator {aggregator!r} (mean, median, trimmed_mean)")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction}")
        _check_privacy(privacy, staleness, sample_weighted, aggregator, clip_norm)
        self._buffer_size = buffer_size
        self.staleness = staleness
        self.sample_weighted = sample_weighted
        self.aggregator: AggregatorName = aggregator
        self.trim_fraction = trim_fraction
        self.optimizer = optimizer if optimizer is not None else ServerSGD(lr=1.0)
        self.privacy = privacy
        self._buffer: list[Contribution] = []

    @property
    def buffer_size(self) -> int:
        """Updates per step (and the fixed DP denominator)."""
        return self._buffer_size

    def pending(self) -> tuple[str, ...]:
        """`update_id`s buffered but not yet applied, in arrival order."""
        return tuple(c.update_id for c in self._buffer)

    def submit(
        self, weights: FloatVector, contribution: Contribution, *, now: float
    ) -> StepResult | None:
        """Buffer the update; step and return new weights when the buffer is due.

        An `update_id` already pending (a broker redelivery) is ignored.
        """
        if contribution.update_id in self.pending():
            return None
        self._check_admitted(contribution)
        check_delta(weights, contribution)
        self._on_arrival(now)
        self._buffer.append(contribution)
        return self._step(weights, now) if self._due(now) else None

    def state_dict(self) -> StateDict:
        """Step count, server-optimizer moments and DP release count (never the buffer)."""
        state = super().state_dict()
        state.update(_prefixed("optimizer", self.optimizer.state_dict()))
        if self.privacy is not None:
            state.update(_prefixed("privacy", self.privacy.state_dict()))
        return state

    def load_state_dict(self, state: StateDict) -> None:
        """Restore a checkpoint; the buffer is emptied (its updates will be redelivered)."""
        super().load_state_dict(state)
        self.optimizer.load_state_dict(_unprefixed("optimizer", state))
        if self.privacy is not None:
            self.privacy.load_state_dict(_unprefixed("privacy", state))
        self._buffer.clear()

    @abstractmethod
    def _due(self, now: float) -> bool:
        """Whether the buffered contributions should be folded in now."""

    def _on_arrival(self, now: float) -> None:
        """Hook: a contribution is about to join the buffer."""

    def _after_step(self, now: float) -> None:
        """Hook: the buffer was folded into the model."""

    def _step(self, weights: FloatVector, now: float) -> StepResult:
        # The buffer is emptied only once the step succeeded, so a failure loses nothing.
        batch = tuple(self._buffer)
        combined, clipped = self._combine(batch)
        new_weights = self.optimizer.step(weights, combined)
        self._buffer.clear()
        self.steps += 1
        self._after_step(now)
        return StepResult(
            weights=new_weights,
            applied=tuple(c.update_id for c in batch),
            info=self._info(batch, clipped, l2_norm(new_weights - weights)),
        )

    def _combine(self, batch: Sequence[Contribution]) -> tuple[FloatVector, int]:
        deltas = [c.delta for c in batch]
        if self.privacy is not None:
            noisy = self.privacy.aggregate(deltas, denominator=self._buffer_size)
            return noisy.delta, noisy.clipped
        clipped = 0
        if self.clip_norm is not None:
            clipped = sum(l2_norm(d) > self.clip_norm for d in deltas)
            deltas = [clip_l2(d, self.clip_norm) for d in deltas]
        scales = [self.staleness(c.staleness) for c in batch]
        if self.aggregator == "mean":
            counts = [float(c.num_examples) if self.sample_weighted else 1.0 for c in batch]
            total = math.fsum(counts)
            coefficients = [s * n / total for s, n in zip(scales, counts, strict=True)]
            return weighted_sum(deltas, coefficients), clipped
        scaled = [d if s == 1.0 else d * np.float32(s) for d, s in zip(deltas, scales, strict=True)]
        if self.aggregator == "median":
            return coordinate_median(scaled), clipped
        return trimmed_mean(scaled, self.trim_fraction), clipped

    def _info(
        self, batch: Sequence[Contribution], clipped: int, step_norm: float
    ) -> dict[str, float]:
        staleness = [c.staleness for c in batch]
        info = {
            "aggregated": float(len(batch)),
            "mean_staleness": math.fsum(staleness) / len(batch),
            "max_staleness": float(max(staleness)),
            "clip_fraction": clipped / len(batch),
            "step_norm": step_norm,
        }
        if self.privacy is not None:
            info["dp_steps"] = float(self.privacy.steps)
            info["dp_noise_std"] = self.privacy.noise_std(self._buffer_size)
        return info


class FedBuff(BufferedStrategy):
    """Steps whenever K admitted updates are buffered, whatever their staleness."""

    name: ClassVar[str] = "fedbuff"

    def __init__(
        self,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        staleness: StalenessFunction | None = None,
        sample_weighted: bool = True,
        aggregator: AggregatorName = "mean",
        trim_fraction: float = DEFAULT_TRIM_FRACTION,
        optimizer: ServerOptimizer | None = None,
        privacy: GaussianAggregateNoise | None = None,
        clip_norm: float | None = None,
        max_staleness: int | None = None,
    ) -> None:
        if staleness is None:
            staleness = ConstantStaleness() if privacy is not None else PolynomialStaleness(a=0.5)
        super().__init__(
            buffer_size=buffer_size,
            staleness=staleness,
            sample_weighted=sample_weighted,
            aggregator=aggregator,
            trim_fraction=trim_fraction,
            optimizer=optimizer,
            privacy=privacy,
            clip_norm=clip_norm,
            max_staleness=max_staleness,
        )

    def _due(self, now: float) -> bool:
        return len(self._buffer) >= self._buffer_size


def _check_privacy(
    privacy: GaussianAggregateNoise | None,
    staleness: StalenessFunction,
    sample_weighted: bool,
    aggregator: AggregatorName,
    clip_norm: float | None,
) -> None:
    if privacy is None:
        return
    if aggregator != "mean":
        raise ValueError(f"central DP needs the mean aggregator, not {aggregator!r}")
    if sample_weighted:
        raise ValueError("central DP needs uniform weights: set sample_weighted=False")
    if not isinstance(staleness, ConstantStaleness):
        raise ValueError(f"central DP needs constant staleness, not {staleness.name!r}")
    if clip_norm is not None:
        raise ValueError(
            "with central DP, updates are clipped to the DP clip norm: leave clip_norm unset"
        )


def _prefixed(prefix: str, state: StateDict) -> StateDict:
    return {f"{prefix}.{key}": value for key, value in state.items()}


def _unprefixed(prefix: str, state: StateDict) -> StateDict:
    start = f"{prefix}."
    return {key[len(start) :]: value for key, value in state.items() if key.startswith(start)}
