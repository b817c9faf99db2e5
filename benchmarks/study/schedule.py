"""Pure event bookkeeping of the virtual clock: pending arrivals and evaluation ticks."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Payload = TypeVar("Payload")


@dataclass(order=True, frozen=True)
class Arrival(Generic[Payload]):
    """An update that reaches the aggregator at virtual time `at`."""

    at: float
    sequence: int
    """Ties at the same instant resolve in the order the work was started: deterministic."""
    site: int = field(compare=False)
    payload: Payload = field(compare=False)


class ArrivalQueue(Generic[Payload]):
    """Updates in flight, popped in arrival order (the order the broker would deliver them)."""

    def __init__(self) -> None:
        self._heap: list[Arrival[Payload]] = []
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, at: float, site: int, payload: Payload) -> None:
        if not math.isfinite(at) or at < 0:
            raise ValueError(f"arrival time must be finite and >= 0, got {at}")
        heapq.heappush(self._heap, Arrival(at, self._sequence, site, payload))
        self._sequence += 1

    def peek_time(self) -> float:
        """Time of the next arrival (infinite when nothing is in flight)."""
        return self._heap[0].at if self._heap else math.inf

    def pop(self) -> Arrival[Payload]:
        return heapq.heappop(self._heap)


class EvalTicks:
    """Regular evaluation instants `every, 2*every, ...` up to `budget` (always included)."""

    def __init__(self, *, every: float, budget: float) -> None:
        if every <= 0 or budget <= 0:
            raise ValueError(f"need every > 0 and budget > 0, got {every} and {budget}")
        self.every = every
        self.budget = budget
        self._next_index = 1

    def due(self, now: float) -> list[float]:
        """The ticks at or before `now` not handed out yet, in order."""
        ticks = []
        while (tick := self._tick(self._next_index)) <= now:
            ticks.append(tick)
            self._next_index += 1
            if tick >= self.budget:
                break
        return ticks

    def _tick(self, index: int) -> float:
        # Computed, not accumulated: no drift after hundreds of ticks.
        tick = min(index * self.every, self.budget)
        if (index - 1) * self.every >= self.budget:
            return math.inf
        return tick
