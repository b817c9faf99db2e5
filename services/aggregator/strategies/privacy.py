"""Central differential privacy for buffered strategies (DP-FedAvg / DP-FedBuff style).

Each update is clipped to L2 norm C, the sum of the clipped updates gets Gaussian noise of
standard deviation z·C per coordinate, and the noisy sum is divided by a fixed denominator
K (the buffer size), so one update changes the aggregate by at most C/K.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.aggregator.strategies.base import FloatVector, StateDict, state_int
from services.aggregator.strategies.robust import clip_l2, l2_norm

SEED_BITS = 256
"""Entropy drawn from the OS for the generator of each release."""
NoiseSource = Callable[[], np.random.Generator]
"""Gives the generator of one release's noise."""


def fresh_generator() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG, never used for more than one release."""
    return np.random.default_rng(secrets.randbits(SEED_BITS))


@dataclass(frozen=True, slots=True)
class NoisyAggregate:
    """The privatised mean and what it took: how many updates had to be clipped."""

    delta: FloatVector
    clipped: int


class GaussianAggregateNoise:
    """Clip, sum, add N(0, (z·C)²) per coordinate, divide by K.

    Every release draws its noise from a generator freshly seeded by the OS CSPRNG: no
    seed exists that could be read from a checkpoint or a task file, and a version released
    again after a restore carries new noise, so two releases never cancel each other's.
    Only the step count (what the accountant composes) is state; it never goes back
    (`load_state_dict`, `advance_to`).
    """

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        source: NoiseSource = fresh_generator,
    ) -> None:
        if clip_norm <= 0:
            raise ValueError(f"DP clip norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"DP noise multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self._source = source
        self._steps = 0

    @property
    def steps(self) -> int:
        """How many noisy aggregates were released (what a privacy accountant composes)."""
        return self._steps

    def noise_std(self, denominator: int) -> float:
        """Standard deviation of the noise per coordinate of the released mean: z·C/K."""
        return self.noise_multiplier * self.clip_norm / denominator

    def aggregate(self, deltas: Sequence[FloatVector], *, denominator: int) -> NoisyAggregate:
        """(Σ clip(d_i, C) + N(0, (z·C)²)) / denominator, uniformly weighted."""
        if not deltas:
            raise ValueError("cannot aggregate zero deltas")
        if denominator < len(deltas):
            raise ValueError(f"denominator {denominator} is below the {len(deltas)} updates")
        total = np.zeros(deltas[0].size, dtype=np.float64)
        clipped = 0
        for delta in deltas:
            clipped += int(l2_norm(delta) > self.clip_norm)
            total += clip_l2(delta, self.clip_norm)
        total += self._noise(total.size)
        self._steps += 1
        return NoisyAggregate(delta=(total / denominator).astype(np.float32), clipped=clipped)

    def state_dict(self) -> StateDict:
        """The step count (releases so far): what the accountant needs after a restart."""
        return {"steps": self._steps}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore the step count (a `seed` left by older checkpoints is ignored)."""
        self.advance_to(state_int(state, "steps"))

    def advance_to(self, steps: int) -> None:
        """Count at least `steps` releases: the count only ever grows."""
        self._steps = max(self._steps, steps)

    def _noise(self, size: int) -> FloatVector:
        noise = self._source().standard_normal(size, dtype=np.float32)
        noise *= np.float32(self.noise_multiplier * self.clip_norm)
        return noise
