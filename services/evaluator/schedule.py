"""When a published version is worth evaluating: newer, far enough past the last, not too soon.

Pure bookkeeping, no I/O: the service asks, evaluates, then records.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Decision(Enum):
    """What to do with a version the evaluator was offered."""

    DUE = "due"
    """Evaluate it now."""
    LATER = "later"
    """Keep it: it is due once `min_interval` has passed (unless a newer one comes first)."""
    STALE = "stale"
    """Already evaluated, or older than what was: drop it."""
    SKIP = "skip"
    """Fewer than `every_n_versions` past the last evaluated one: drop it."""


@dataclass
class EvalSchedule:
    """Evaluate every n-th version at most every `min_interval` seconds.

    "Every n-th" counts from the last evaluated version rather than `version % n`:
    follower queues keep only the newest model, so a slow evaluator never sees some
    versions, and a modulus could then skip forever.
    """

    every_n_versions: int = 1
    min_interval: float = 0.0
    last_version: int | None = None
    last_time: float | None = None

    def __post_init__(self) -> None:
        if self.every_n_versions < 1 or self.min_interval < 0:
            raise ValueError("need every_n_versions >= 1 and min_interval >= 0")

    def decide(self, version: int, *, now: float) -> Decision:
        """Whether `version`, offered at time `now`, should be evaluated."""
        last = self.last_version
        if last is not None and version <= last:
            return Decision.STALE
        if last is not None and version - last < self.every_n_versions:
            return Decision.SKIP
        if self.last_time is not None and now - self.last_time < self.min_interval:
            return Decision.LATER
        return Decision.DUE

    def record(self, version: int, *, now: float) -> None:
        """`version` was evaluated at time `now`."""
        self.last_version = version
        self.last_time = now
