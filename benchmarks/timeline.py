"""What a finished real-process federation did, read back from its logs and events.

Trainers log `joined` and `update sent` (with the round's `train_seconds`) as JSON lines,
the evaluator appends every report to its JSONL log with the publication time of the
version it scored, and the aggregator announces every version on `fedmq.events`. All
clocks are the same machine's wall clock.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SiteTimeline:
    """One site: when it joined, when its first update was confirmed, how long it trained."""

    name: str
    examples: int | None
    joined_at: float | None
    first_update_at: float | None
    first_train_s: float | None
    updates_sent: int

    @property
    def latency_s(self) -> float | None:
        """Seconds from `joined` to the broker's confirm of the first update."""
        if self.joined_at is None or self.first_update_at is None:
            return None
        return self.first_update_at - self.joined_at


def read_site(log: Path) -> SiteTimeline:
    """A trainer's timeline from its JSON log lines."""
    joined = first = train = None
    examples: int | None = None
    sent = 0
    for record in _records(log):
        event = record.get("event")
        if event == "joined" and joined is None:
            joined, examples = _epoch(record["timestamp"]), record.get("examples")
        elif event == "update sent":
            sent += 1
            if first is None:
                first, train = _epoch(record["timestamp"]), record.get("train_seconds")
    return SiteTimeline(log.stem, examples, joined, first, train, sent)


def read_evaluations(eval_log: Path, *, split: str = "test") -> list[dict[str, Any]]:
    """The evaluator's reports on `split`, in the order they were written."""
    return [r for r in _records(eval_log) if r.get("split", "test") == split]


def time_to_accuracy(
    reports: Iterable[dict[str, Any]], targets: Sequence[float], *, start: float
) -> dict[str, float | None]:
    """Per target: seconds from `start` to the PUBLICATION of the first version that scored it.

    Publication, not evaluation: a version is as good when it is published as when the
    evaluator gets round to it. None where no evaluated version reached the target.
    """
    published = sorted((r["model_published_at"], r["accuracy"]) for r in reports)
    result: dict[str, float | None] = {}
    for target in targets:
        hit = next((at for at, accuracy in published if accuracy >= target), None)
        result[f"{target:g}"] = None if hit is None else round(hit - start, 3)
    return result


def best_accuracy(reports: Iterable[dict[str, Any]]) -> float | None:
    """The best accuracy any report gave (an optimistic bound when taken on test)."""
    scores = [r["accuracy"] for r in reports]
    return max(scores) if scores else None


def site_rows(
    sites: Sequence[SiteTimeline], start: float, slowdowns: dict[str, float]
) -> list[dict[str, Any]]:
    """One JSON row per site: join time, latency, the round's training time, the overhead."""
    rows = []
    for site in sites:
        latency = site.latency_s
        train = site.first_train_s
        rows.append(
            {
                "site": site.name,
                "examples": site.examples,
                "slowdown": slowdowns.get(site.name, 1.0),
                "joined_s": _rounded(None if site.joined_at is None else site.joined_at - start),
                "join_to_first_update_s": _rounded(latency),
                "first_round_train_s": _rounded(train),
                "overhead_s": _rounded(
                    None if latency is None or train is None else latency - train
                ),
                "updates_sent": site.updates_sent,
            }
        )
    return rows


def latency_summary(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The figures the latency target and its CI guard look at, over the sites that sent.

    `worst_ratio` is the largest `join_to_first_update / first_round_train` of a site,
    `total_ratio` the sum of the latencies over the sum of the training times (steadier:
    the sites with more data weigh more, a site of two batches cannot swing it).
    """
    done = [r for r in rows if r["overhead_s"] is not None]
    if not done:
        return {"sites_sent": 0, "overhead_max_s": None, "overhead_median_s": None,
                "worst_ratio": None, "total_ratio": None}  # fmt: skip
    overheads = [r["overhead_s"] for r in done]
    ratios = [
        r["join_to_first_update_s"] / r["first_round_train_s"]
        for r in done
        if r["first_round_train_s"]
    ]
    trained = sum(r["first_round_train_s"] or 0.0 for r in done)
    waited = sum(r["join_to_first_update_s"] for r in done)
    return {
        "sites_sent": len(done),
        "overhead_max_s": round(max(overheads), 3),
        "overhead_median_s": round(statistics.median(overheads), 3),
        "worst_ratio": round(max(ratios), 3) if ratios else None,
        "total_ratio": round(waited / trained, 3) if trained > 0 else None,
    }


def median_or_none(values: Iterable[float | None]) -> float | None:
    """The median, a missing value counting as infinitely late; None if that is the median."""
    finite = [v if v is not None else float("inf") for v in values]
    if not finite:
        return None
    middle = statistics.median_low(finite) if len(finite) % 2 == 0 else statistics.median(finite)
    return None if middle == float("inf") else round(middle, 3)


def _records(path: Path) -> Iterable[dict[str, Any]]:
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
