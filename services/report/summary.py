"""The numbers of a report, pure: time and updates to a target accuracy, best and final scores."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.report.logs import EvalPoint, Run


@dataclass(frozen=True)
class TargetResult:
    """When a run first reached `target` test accuracy; None where it never did."""

    target: float
    seconds: float | None
    updates: int | None


TAIL_WINDOW_S = 30.0
"""The window at the end of a run whose mean and minimum the report leads with."""


@dataclass(frozen=True)
class RunSummary:
    """One row of the report table.

    The honest numbers come first: the test scores of the version selected on the
    validation split (`selected_*`, None without validation reports), of the final
    version, and the mean and minimum over the last `TAIL_WINDOW_S` seconds. `best_*` is
    the maximum over every version on the test split itself: an optimistic bound, not a
    result, since picking on test overfits to it.
    """

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
    selected_version: int | None = None
    selected_val_score: float | None = None
    """The selection metric (val balanced accuracy) of the selected version."""
    selected_accuracy: float | None = None
    selected_auc: float | None = None
    tail_mean_accuracy: float | None = None
    tail_min_accuracy: float | None = None
    tail_mean_auc: float | None = None
    tail_min_auc: float | None = None
    majority_rate: float | None = None


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
    selected = select_on_validation(run.selection_points)
    selected_test = (
        None
        if selected is None
        else next((p for p in reversed(points) if p.version == selected.version), None)
    )
    tail = tail_points(points, TAIL_WINDOW_S)
    tail_aucs = [point.auc for point in tail if point.auc is not None]
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
        selected_version=None if selected is None else selected.version,
        selected_val_score=None if selected is None else selected.balanced_accuracy,
        selected_accuracy=None if selected_test is None else selected_test.accuracy,
        selected_auc=None if selected_test is None else selected_test.auc,
        tail_mean_accuracy=sum(p.accuracy for p in tail) / len(tail),
        tail_min_accuracy=min(p.accuracy for p in tail),
        tail_mean_auc=sum(tail_aucs) / len(tail_aucs) if tail_aucs else None,
        tail_min_auc=min(tail_aucs) if tail_aucs else None,
        majority_rate=run.majority_rate,
    )


def select_on_validation(points: Sequence[EvalPoint]) -> EvalPoint | None:
    """The validation point of the selected version: highest balanced accuracy, then AUC,
    then lowest loss; the earliest among equals (as the evaluator's `best` artifact)."""
    best: EvalPoint | None = None
    for point in points:
        if best is None or _selection_key(point) > _selection_key(best):
            best = point
    return best


def tail_points(points: Sequence[EvalPoint], window: float) -> list[EvalPoint]:
    """The evaluations within `window` seconds of the last one (at least the last one)."""
    end = points[-1].seconds
    return [point for point in points if point.seconds >= end - window]


def _selection_key(point: EvalPoint) -> tuple[float, float, float]:
    auc = -math.inf if point.auc is None else point.auc
    return (point.balanced_accuracy, auc, -point.loss)
