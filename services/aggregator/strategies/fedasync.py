"""FedAsync (Xie et al. 2019), delta form: every update moves the model at once.

x <- x + alpha · s(staleness) · delta, with an optional L2 clip of delta first.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from services.aggregator.strategies.base import (
    Contribution,
    FloatVector,
    StepResult,
    Strategy,
    check_delta,
)
from services.aggregator.strategies.robust import clip_l2, l2_norm
from services.aggregator.strategies.staleness import PolynomialStaleness, StalenessFunction

DEFAULT_ALPHA = 0.6
"""Mixing weight of a fresh update (the paper's experiments use 0.6)."""


class FedAsync(Strategy):
    """Applies each admitted update immediately, down-weighted by its staleness."""

    name: ClassVar[str] = "fedasync"

    def __init__(
        self,
        *,
        alpha: float = DEFAULT_ALPHA,
        staleness: StalenessFunction | None = None,
        clip_norm: float | None = None,
        max_staleness: int | None = None,
    ) -> None:
        super().__init__(clip_norm=clip_norm, max_staleness=max_staleness)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness if staleness is not None else PolynomialStaleness(a=0.5)

    def submit(self, weights: FloatVector, contribution: Contribution, *, now: float) -> StepResult:
        """Return `weights + alpha · s(t) · clip(delta)` as a new array."""
        self._check_admitted(contribution)
        check_delta(weights, contribution)
        delta = contribution.delta
        clipped = self.clip_norm is not None and l2_norm(delta) > self.clip_norm
        if self.clip_norm is not None:
            delta = clip_l2(delta, self.clip_norm)
        weight = self.alpha * self.staleness(contribution.staleness)
        # One new array (the old weights may still be referenced by a checkpoint in flight).
        new_weights = np.multiply(delta, np.float32(weight), dtype=np.float32)
        new_weights += weights
        self.steps += 1
        return StepResult(
            weights=new_weights,
            applied=(contribution.update_id,),
            info={
                "aggregated": 1.0,
                "mean_staleness": float(contribution.staleness),
                "max_staleness": float(contribution.staleness),
                "mixing_weight": weight,
                "clip_fraction": float(clipped),
            },
        )
