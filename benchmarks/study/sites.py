"""A simulated site: its data, its notional machine's speed, its honesty, its counters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.data import ImageDataset

SITE_SEED_STRIDE = 1000
"""Site `i` of a study seeded `s` trains with seed `s * stride + i` (`fedmq trainer --seed`)."""


@dataclass
class Site:
    """One trainer of the federation and what it did during a run."""

    index: int
    data: ImageDataset
    slowdown: float = 1.0
    attack_scale: float | None = None
    seed: int = 0
    rounds: int = 0
    """Local rounds started (the trainer's round counter: it seeds the data order)."""
    delivered: int = 0
    rejected: int = 0
    busy_s: float = 0.0
    base_version: int = 0
    durations: list[float] = field(default_factory=list)

    @property
    def trainer_id(self) -> str:
        return f"site-{self.index}"

    def summary(self) -> dict[str, object]:
        return {
            "site": self.index,
            "examples": len(self.data),
            "positives": int(self.data.labels.sum()),
            "slowdown": self.slowdown,
            "attack_scale": self.attack_scale,
            "rounds_started": self.rounds,
            "updates_delivered": self.delivered,
            "updates_rejected": self.rejected,
            "mean_update_seconds": (sum(self.durations) / len(self.durations))
            if self.durations
            else None,
        }


def samples_in_steps(size: int, batch_size: int, steps: int) -> int:
    """Examples `steps` batches process when epochs of `size` repeat (as `train_local` does).

    The last batch of an epoch is short, and dropped when it would hold a single example.
    """
    if size < 1 or batch_size < 1 or steps < 0:
        raise ValueError("need size >= 1, batch_size >= 1, steps >= 0")
    drop_last = size > 1 and size % batch_size == 1
    per_epoch = size // batch_size if drop_last else math.ceil(size / batch_size)
    epoch_samples = per_epoch * batch_size if drop_last else size
    full_epochs, rest = divmod(steps, per_epoch)
    return full_epochs * epoch_samples + min(rest * batch_size, size)
