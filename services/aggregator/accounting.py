"""Privacy accounting for central DP: (epsilon, delta) after every released model version.

What is composed. Each server step releases `(Σ clip(d_i, C) + N(0, (z·C)²)) / K`, with K
fixed. Adding or removing one trainer's update changes the sum by at most C, so one step
is a Gaussian mechanism with noise multiplier z, and T steps are T such mechanisms,
composed with the RDP accountant of `dp_accounting` (add-or-remove-one neighbours).

The unit is the trainer (user-level DP: a whole site's contribution is hidden, hence
every record in it), provided a trainer contributes at most one update to any one step;
the core enforces that when an accountant is attached (a second update from a trainer
whose first one is still buffered is refused). Every trainer is assumed to take part in
every step, the worst case.

No amplification by sampling. Amplification needs each trainer to take part in a step
with a known probability q, drawn by the server independently of the data. Here trainers
decide themselves when they publish (how fast they train, when they are online), so no
such q exists and the accountant composes the full mechanism (q = 1). The epsilon
reported is therefore an upper bound that can be loose, never an optimistic guess.
"""

from __future__ import annotations

import math
from functools import lru_cache

from services.aggregator.strategies.base import Strategy
from services.aggregator.strategies.fedbuff import BufferedStrategy
from services.aggregator.strategies.privacy import GaussianAggregateNoise

DEFAULT_DELTA = 1e-5
"""delta of the reported (epsilon, delta); should be well below 1/number of trainers."""


@lru_cache(maxsize=1024)
def gaussian_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """epsilon after `steps` Gaussian mechanisms of multiplier z (RDP accountant, q = 1).

    0 before the first step; infinite with z = 0 (nothing hides a contribution).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0.0:
        return math.inf
    # Imported here: dp_accounting pulls in scipy (seconds), which only DP runs should pay.
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), steps)
    return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """Watches one `GaussianAggregateNoise` (whose checkpointed `steps` count releases).

    `budget` (an epsilon) is the most the aggregator may spend: `exhausted` turns true as
    soon as one more release would exceed it, and from then on nothing is applied.
    """

    def __init__(
        self,
        noise: GaussianAggregateNoise,
        *,
        delta: float = DEFAULT_DELTA,
        budget: float | None = None,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if budget is not None and budget <= 0.0:
            raise ValueError(f"the epsilon budget must be > 0, got {budget}")
        self.noise = noise
        self.delta = delta
        self.budget = budget

    @property
    def steps(self) -> int:
        """Noisy aggregates released so far."""
        return self.noise.steps

    @property
    def epsilon(self) -> float:
        """epsilon spent by the releases so far (at `delta`)."""
        return self.epsilon_after(self.steps)

    @property
    def exhausted(self) -> bool:
        """Whether the next release would take epsilon past the budget."""
        return self.budget is not None and self.epsilon_after(self.steps + 1) > self.budget

    def epsilon_after(self, steps: int) -> float:
        """epsilon once `steps` aggregates have been released."""
        return gaussian_epsilon(self.noise.noise_multiplier, steps, self.delta)


def privacy_accountant(
    strategy: Strategy, *, delta: float = DEFAULT_DELTA, budget: float | None = None
) -> PrivacyAccountant | None:
    """The accountant of a strategy with central DP; None when the strategy adds no noise."""
    if not isinstance(strategy, BufferedStrategy) or strategy.privacy is None:
        return None
    return PrivacyAccountant(strategy.privacy, delta=delta, budget=budget)
