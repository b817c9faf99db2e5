"""Central differential privacy for buffered strategies (DP-FedAvg / DP-FedBuff style).

Each update is clipped to L2 norm C, the sum of the clipped updates gets Gaussian noise of
standard deviation z·C per coordinate, and the noisy sum is divided by a fixed denominator
K (the buffer size), so one update changes the aggregate by at most C/K.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.aggregator.strategies.base import FloatVector, StateDict, state_int
from services.aggregator.strategies.robust import clip_l2, l2_norm

SEED_BITS = 63
"""Size of a seed drawn from the OS when none is configured (fits a signed 64-bit int)."""


@dataclass(frozen=True, slots=True)
class NoisyAggregate:
    """The privatised mean and what it took: how many updates had to be clipped."""

    delta: FloatVector
    clipped: int


class GaussianAggregateNoise:
    """Clip, sum, add N(0, (z·C)²) per coordinate, divide by K.

    The noise of step k comes from a generator seeded by `(seed, k)`, so `state_dict`
    (seed and step count) is enough for a restarted aggregator to continue the exact same
    noise sequence. The seed is a secret: whoever knows it can subtract the noise, so it
    lives in the checkpoint, never in a published model or event. Without a configured
    seed, one is drawn from the OS.
    """

    def __init__(
        self, *, clip_norm: float, noise_multiplier: float, seed: int | None = None
    ) -> None:
        if clip_norm <= 0:
            raise ValueError(f"DP clip norm must be > 0, got {clip_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"DP noise multiplier must be >= 0, got {noise_multiplier}")
        if seed is not None and seed < 0:
            raise ValueError(f"DP seed must be >= 0, got {seed}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.seed = secrets.randbits(SEED_BITS) if seed is None else seed
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
        """Seed and step count: all that is needed to continue the noise sequence."""
        return {"seed": self.seed, "steps": self._steps}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore seed and step count."""
        self.seed = state_int(state, "seed")
        self._steps = state_int(state, "steps")

    def _noise(self, size: int) -> FloatVector:
        sequence = np.random.SeedSequence(self.seed, spawn_key=(self._steps,))
        rng = np.random.default_rng(sequence)
        noise = rng.standard_normal(size, dtype=np.float32)
        noise *= np.float32(self.noise_multiplier * self.clip_norm)
        return noise
