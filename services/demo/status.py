"""What a watcher knows about a running federation, folded from `fedmq.events` messages."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pydantic import BaseModel
from rich.table import Table

from schemas import (
    EvalReport,
    Heartbeat,
    ModelPublished,
    Rejection,
    TrainerJoined,
    TrainerLeft,
)


@dataclass
class FederationStatus:
    """Running totals of one task, as seen on the events exchange."""

    task_id: str
    started_at: float = field(default_factory=time.time)
    version: int = 0
    updates_applied: int = 0
    updates_rejected: int = 0
    mean_staleness: float = 0.0
    trainers: dict[str, str] = field(default_factory=dict)
    """Trainer id -> its last known state (training, waiting, left, ...)."""
    evaluations: list[EvalReport] = field(default_factory=list)
    rejections: Counter[str] = field(default_factory=Counter)
    updates_sent: dict[str, int] = field(default_factory=dict)
    """Trainer id -> updates it says it sent (from its heartbeats)."""
    rejected_by_trainer: Counter[str] = field(default_factory=Counter)

    @property
    def test_evaluations(self) -> list[EvalReport]:
        """The evaluations on the `test` split (the evaluator also reports `val`)."""
        return [r for r in self.evaluations if r.split == "test"]

    @property
    def latest_eval(self) -> EvalReport | None:
        """The test evaluation of the newest version evaluated so far."""
        return max(self.test_evaluations, key=lambda r: r.version, default=None)

    @property
    def best_accuracy(self) -> float | None:
        """Best test accuracy over every evaluated version (an optimistic bound)."""
        return max((r.accuracy for r in self.test_evaluations), default=None)

    @property
    def active_trainers(self) -> int:
        """Trainers that joined and did not leave."""
        return sum(1 for state in self.trainers.values() if state != "left")

    def observe(self, message: BaseModel) -> None:
        """Fold one event into the totals (events of other tasks are ignored)."""
        if getattr(message, "task_id", self.task_id) != self.task_id:
            return
        if isinstance(message, ModelPublished):
            self.version = max(self.version, message.version)
            self.updates_applied = max(self.updates_applied, message.updates_applied)
            self.updates_rejected = max(self.updates_rejected, message.updates_rejected)
            self.mean_staleness = message.mean_staleness
        elif isinstance(message, EvalReport):
            self.evaluations.append(message)
        elif isinstance(message, TrainerJoined):
            self.trainers[message.trainer_id] = "joined"
        elif isinstance(message, TrainerLeft):
            self.trainers[message.trainer_id] = "left"
            sent = max(self.updates_sent.get(message.trainer_id, 0), message.updates_sent)
            self.updates_sent[message.trainer_id] = sent
        elif isinstance(message, Heartbeat) and message.role == "trainer":
            if self.trainers.get(message.sender_id) != "left":
                self.trainers[message.sender_id] = message.state
            sent = max(self.updates_sent.get(message.sender_id, 0), message.updates_sent)
            self.updates_sent[message.sender_id] = sent
        elif isinstance(message, Rejection):
            self.rejections[message.reason] += 1
            if message.trainer_id is not None:
                self.rejected_by_trainer[message.trainer_id] += 1

    def table(self) -> Table:
        """A one-glance table of the federation, for a live terminal view."""
        table = Table(title=f"fedmq task {self.task_id}", title_justify="left", expand=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        latest = self.latest_eval
        elapsed = time.time() - self.started_at
        rows = [
            ("elapsed", f"{elapsed:6.0f} s"),
            ("model version", str(self.version)),
            ("updates applied", str(self.updates_applied)),
            ("updates rejected", _rejections(self.updates_rejected, self.rejections)),
            ("mean staleness", f"{self.mean_staleness:.2f}"),
            ("trainers", _trainers(self.trainers)),
            ("test accuracy", _eval_text(latest, "accuracy")),
            ("test AUC", _eval_text(latest, "auc")),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table


def _rejections(total: int, by_reason: Counter[str]) -> str:
    if not by_reason:
        return str(total)
    reasons = ", ".join(f"{reason} {count}" for reason, count in by_reason.most_common())
    return f"{total} ({reasons})"


def _trainers(trainers: dict[str, str]) -> str:
    active = sorted(t for t, state in trainers.items() if state != "left")
    left = sorted(t for t, state in trainers.items() if state == "left")
    text = f"{len(active)} active"
    if left:
        text += f", {len(left)} left"
    return text


def _eval_text(report: EvalReport | None, metric: str) -> str:
    if report is None:
        return "waiting for the first evaluation"
    value = getattr(report, metric)
    shown = "n/a" if value is None else f"{value:.3f}"
    return f"{shown} (version {report.version})"
