"""What a study leaves behind: the full JSON, a small summary JSON, the figure, a Markdown table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.study.runner import RunOutcome
from benchmarks.study.studies import TARGETS
from services.report.logs import load_run
from services.report.plots import report_figure

VIRTUAL_TIME_LABEL = "virtual wall-clock seconds (every site on its own machine)"

TAIL_FRACTION = 0.25
"""'Ends at': the time-weighted mean over the last quarter of the budget, since accuracy
swings between consecutive versions and a single final evaluation is a coin toss."""


def tail_mean(points: Sequence[dict[str, Any]], key: str, *, end: float) -> float | None:
    """Time-weighted mean of `key` over [end * (1 - TAIL_FRACTION), end], holding each value
    from its point's time until the next point's."""
    start = end * (1 - TAIL_FRACTION)
    total = weight = 0.0
    for point, following in zip(points, [*points[1:], None], strict=True):
        begin = max(point["t"], start)
        until = min(following["t"] if following else end, end)
        if until > begin and point[key] is not None:
            total += point[key] * (until - begin)
            weight += until - begin
    return total / weight if weight else None


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def summary_document(header: dict[str, Any], outcomes: Sequence[RunOutcome]) -> dict[str, Any]:
    """The few numbers per run worth keeping next to the figure."""
    return {**header, "runs": [_short(outcome) for outcome in outcomes]}


def write_figure(outcomes: Sequence[RunOutcome], path: Path, *, title: str) -> Path:
    """`services.report`'s figure of the runs' eval logs, its time axes labelled as virtual."""
    runs = [load_run(outcome.run_dir) for outcome in outcomes]
    figure = report_figure(runs, targets=TARGETS, title=title)
    for axes in figure.axes[:2]:  # the two panels against time
        axes.set_xlabel(VIRTUAL_TIME_LABEL)
        axes.set_title(axes.get_title().replace("vs time", "vs virtual time"))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def markdown_table(outcomes: Sequence[RunOutcome]) -> str:
    """One row per run: time to 0.80 / 0.85, best, final and tail accuracy and AUC, extras."""
    header = (
        "| run | t(0.80) s | t(0.85) s | best acc | final acc | tail acc | best AUC | final AUC "
        "| tail AUC | versions | staleness | epsilon |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    return "\n".join([header, *(_row(outcome) for outcome in outcomes)]) + "\n"


def _row(outcome: RunOutcome) -> str:
    s, stats = outcome.summary, outcome.statistics
    reach = [_seconds(t["seconds"]) for t in s["targets"]]
    tail = _tail(outcome)
    cells = [
        outcome.spec.name, *reach, _score(s["best_accuracy"]), _score(s["final_accuracy"]),
        _score(tail["tail_accuracy"]), _score(s["best_auc"]), _score(s["final_auc"]),
        _score(tail["tail_auc"]), str(stats.get("versions", "-")),
        _number(stats.get("mean_staleness")), _epsilon(stats.get("epsilon")),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _short(outcome: RunOutcome) -> dict[str, Any]:
    s, stats = outcome.summary, outcome.statistics
    keep = ("versions", "updates_applied", "updates_rejected", "mean_staleness", "epsilon")
    return {
        "name": outcome.spec.name,
        "best_accuracy": s["best_accuracy"],
        "final_accuracy": s["final_accuracy"],
        "best_auc": s["best_auc"],
        "final_auc": s["final_auc"],
        **_tail(outcome),
        "seconds_to": {str(t["target"]): t["seconds"] for t in s["targets"]},
        **{key: stats[key] for key in keep if key in stats},
    }


def _tail(outcome: RunOutcome) -> dict[str, float | None]:
    end = outcome.budget_s
    return {
        "tail_accuracy": tail_mean(outcome.points, "accuracy", end=end),
        "tail_auc": tail_mean(outcome.points, "auc", end=end),
    }


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _epsilon(value: float | str | None) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3g}"
