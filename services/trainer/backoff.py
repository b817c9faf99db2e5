"""Bounded, jittered, capped exponential backoff for retries (joins, refused publishes)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

BACKOFF_INITIAL_S = 0.5
"""First pause after a failure: short, a busy aggregator often recovers at once."""
BACKOFF_MAX_S = 30.0
"""Longest pause between two attempts, however many failed."""
BACKOFF_FACTOR = 2.0
BACKOFF_JITTER = 0.25
"""Each pause is scaled by a random factor in [1 - jitter, 1 + jitter] so that many
trainers refused at the same moment do not all come back at the same moment."""


@dataclass
class Backoff:
    """The next pause to take; `reset()` after a success."""

    initial: float = BACKOFF_INITIAL_S
    maximum: float = BACKOFF_MAX_S
    factor: float = BACKOFF_FACTOR
    jitter: float = BACKOFF_JITTER
    rng: random.Random = field(default_factory=random.Random)
    _current: float = field(default=0.0, init=False)

    def next_delay(self) -> float:
        """The pause before the next attempt (grows until `maximum`)."""
        self._current = (
            self.initial if self._current == 0.0 else min(self._current * self.factor, self.maximum)
        )
        spread = self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return min(self._current * spread, self.maximum)

    def reset(self) -> None:
        """Start again from `initial` (after a successful attempt)."""
        self._current = 0.0
