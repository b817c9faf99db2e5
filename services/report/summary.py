"""The numbers of a report, pure: time and updates to a target accuracy, best and final scores."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.report.logs import EvalPoint, Run


@dataclass(frozen=True)
class TargetResult:
    """When a run first reached `target` test accuracy; None where it never did."""

    target: float
    seconds: float | None
    updates: int | None


@dataclass(frozen=True)
class RunSummary:
    """One row of the report table."""

    name: str
    kind: str
    model: str
    strategy: str | None
    evaluations: int
    best_accuracy: float
    best_auc: float | None
    final_accuracy: float
    final_auc: float | None
    final_seconds: float
    final_updates: int
    targets: tuple[TargetResult, ...]


def first_reaching(points: Iterable[EvalPoint], target: float) -> EvalPoint | None:
    """The earliest point (points are in time order) with accuracy >= `target`."""
    return next((point for point in points if point.accuracy >= target), None)


def time_to_reach(points: Iterable[EvalPoint], target: float) -> float | None:
    """Seconds since the run's start at which accuracy first reached `target`, else None."""
    point = first_reaching(points, target)
    return None if point is None else point.seconds


def updates_to_reach(points: Iterable[EvalPoint], target: float) -> int | None:
    """Updates applied when accuracy first reached `target`, else None."""
    point = first_reaching(points, target)
    return None if point is None else point.updates


def summarize(run: Run, targets: Sequence[float] = ()) -> RunSummary:
    """Best, final and time-to-target numbers of `run` (which has at least one point)."""
    points = run.points
    if not points:
        raise ValueError(f"run {run.name!r} has no evaluation to summarise")
    aucs = [point.auc for point in points if point.auc is not None]
    final = points[-1]
    return RunSummary(
        name=run.name,
        kind=run.manifest.kind,
        model=run.manifest.model,
        strategy=run.manifest.strategy,
        evaluations=len(points),
        best_accuracy=max(point.accuracy for point in points),
        best_auc=max(aucs) if aucs else None,
        final_accuracy=final.accuracy,
        final_auc=final.auc,
        final_seconds=final.seconds,
        final_updates=final.updates,
        targets=tuple(
            TargetResult(target, time_to_reach(points, target), updates_to_reach(points, target))
            for target in targets
        ),
    )
