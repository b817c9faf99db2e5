"""The report table: one row per run, as Markdown (report.md) and as a rich table (terminal)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

from services.report.summary import RunSummary

NOT_REACHED = "not reached"
MISSING = "n/a"


def format_target(target: float) -> str:
    """`0.8` -> `0.80`; more decimals only where the target has them (`0.855`)."""
    return f"{target:.2f}" if round(target, 2) == target else f"{target:g}"


def table_headers(targets: Sequence[float]) -> list[str]:
    """Column titles, with a time and an updates column per target accuracy."""
    per_target = [
        title
        for target in targets
        for title in (f"time to {format_target(target)} (s)", f"updates to {format_target(target)}")
    ]
    return [
        "run", "kind", "model", "evals",
        "val-selected version", "test acc (val-selected)", "test AUC (val-selected)",
        "final acc", "final AUC", "last 30 s mean acc", "last 30 s min acc",
        "last 30 s mean AUC", "majority-class rate", *per_target,
        "best test acc (optimistic bound)", "best test AUC (optimistic bound)", "duration (s)",
    ]  # fmt: skip


def table_rows(summaries: Sequence[RunSummary]) -> list[list[str]]:
    """The cells of every row, formatted (seconds to 0.1, scores to 4 decimals)."""
    return [_row(summary) for summary in summaries]


def markdown_table(summaries: Sequence[RunSummary], targets: Sequence[float]) -> str:
    """A GitHub-flavoured Markdown table of `summaries` (all summarised with `targets`)."""
    headers = table_headers(targets)
    lines = [
        _markdown_line(headers),
        _markdown_line(["---" if i < 3 else "---:" for i in range(len(headers))]),
        *(_markdown_line(row) for row in table_rows(summaries)),
    ]
    return "\n".join(lines) + "\n"


def rich_table(
    summaries: Sequence[RunSummary], targets: Sequence[float], *, title: str | None = None
) -> Table:
    """The same numbers for the terminal, transposed (a column per run) to fit 80 columns."""
    headers = table_headers(targets)
    rows = table_rows(summaries)
    table = Table(title=title)
    table.add_column("", style="bold")
    for row in rows:
        table.add_column(escape(row[0]), justify="right")
    for index, header in enumerate(headers[1:], start=1):
        table.add_row(header, *(escape(row[index]) for row in rows))
    return table


def _row(summary: RunSummary) -> list[str]:
    per_target = [
        cell
        for result in summary.targets
        for cell in (
            NOT_REACHED if result.seconds is None else f"{result.seconds:.1f}",
            NOT_REACHED if result.updates is None else str(result.updates),
        )
    ]
    return [
        summary.name,
        summary.kind if summary.strategy is None else f"{summary.kind} ({summary.strategy})",
        summary.model,
        str(summary.evaluations),
        MISSING if summary.selected_version is None else str(summary.selected_version),
        _score(summary.selected_accuracy),
        _score(summary.selected_auc),
        _score(summary.final_accuracy),
        _score(summary.final_auc),
        _score(summary.tail_mean_accuracy),
        _score(summary.tail_min_accuracy),
        _score(summary.tail_mean_auc),
        _score(summary.majority_rate),
        *per_target,
        _score(summary.best_accuracy),
        _score(summary.best_auc),
        f"{summary.final_seconds:.1f}",
    ]


def _score(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _markdown_line(cells: Sequence[str]) -> str:
    escaped = (cell.replace("|", "\\|").replace("\n", " ") for cell in cells)
    return "| " + " | ".join(escaped) + " |"
