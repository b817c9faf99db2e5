"""Which trainers take part: joined by RPC, kept alive by heartbeats, gone on timeout or leave."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TRAINER_TIMEOUT_S = 30.0
"""A trainer silent for this long is considered gone (trainers beat every few seconds)."""


@dataclass
class TrainerRecord:
    """What the aggregator knows of one trainer."""

    trainer_id: str
    num_examples: int
    joined_at: float
    last_seen: float
    updates_accepted: int = 0


class TrainerRegistry:
    """Active trainers keyed by id; every method returns whether membership changed."""

    def __init__(self, *, timeout: float = DEFAULT_TRAINER_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._trainers: dict[str, TrainerRecord] = {}

    def __contains__(self, trainer_id: object) -> bool:
        return trainer_id in self._trainers

    def __len__(self) -> int:
        return len(self._trainers)

    def get(self, trainer_id: str) -> TrainerRecord | None:
        """The record of an active trainer, if any."""
        return self._trainers.get(trainer_id)

    def join(self, trainer_id: str, *, num_examples: int, now: float) -> bool:
        """Register (or refresh) a trainer; True when it was not active before."""
        record = self._trainers.get(trainer_id)
        if record is not None:
            record.num_examples = num_examples
            record.last_seen = now
            return False
        self._trainers[trainer_id] = TrainerRecord(trainer_id, num_examples, now, now)
        return True

    def seen(self, trainer_id: str, *, now: float) -> bool:
        """A heartbeat or an update arrived; True when this (re)activates the trainer."""
        record = self._trainers.get(trainer_id)
        if record is None:
            return self.join(trainer_id, num_examples=0, now=now)
        record.last_seen = max(record.last_seen, now)
        return False

    def accepted(self, trainer_id: str, *, now: float) -> bool:
        """Count an accepted update; True when it (re)activated the trainer."""
        new = self.seen(trainer_id, now=now)
        self._trainers[trainer_id].updates_accepted += 1
        return new

    def leave(self, trainer_id: str) -> bool:
        """The trainer said goodbye; True when it was active."""
        return self._trainers.pop(trainer_id, None) is not None

    def expire(self, *, now: float) -> list[str]:
        """Drop and return the trainers not heard from within the timeout."""
        gone = [t for t, r in self._trainers.items() if now - r.last_seen > self.timeout]
        for trainer_id in gone:
            del self._trainers[trainer_id]
        return gone
