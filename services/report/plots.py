"""The report figure: accuracy and AUC against wall-clock time and against updates applied.

Drawn with the Agg canvas directly (no pyplot, no global backend state), so it works on
headless machines and inside tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.report.logs import EvalPoint, Run
from services.report.tables import format_target

FIGURE_SIZE_IN = (13.0, 9.0)
DPI = 110
"""About 1430 x 990 pixels: readable on a laptop screen and in a Markdown preview."""

TIME_LABEL = "wall-clock seconds since run start"
UPDATES_LABEL = "updates applied (federated: client updates; centralized: optimizer steps)"

_Metric = Callable[[EvalPoint], float | None]
_Axis = Callable[[EvalPoint], float]


def _seconds(point: EvalPoint) -> float:
    return point.seconds


def _updates(point: EvalPoint) -> float:
    return float(point.updates)


def _accuracy(point: EvalPoint) -> float | None:
    return point.accuracy


def _auc(point: EvalPoint) -> float | None:
    return point.auc


# (row, column) -> (x accessor, x label, metric accessor, metric label)
_PANELS: tuple[tuple[_Axis, str, _Metric, str], ...] = (
    (_seconds, TIME_LABEL, _accuracy, "test accuracy"),
    (_seconds, TIME_LABEL, _auc, "test AUC"),
    (_updates, UPDATES_LABEL, _accuracy, "test accuracy"),
    (_updates, UPDATES_LABEL, _auc, "test AUC"),
)


def report_figure(
    runs: Sequence[Run], *, targets: Sequence[float] = (), title: str = "fedmq runs"
) -> Figure:
    """A 2x2 figure, one line per run; dashed lines mark the target accuracies."""
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    for ax, (x_of, x_label, y_of, y_label) in zip(axes.flat, _PANELS, strict=True):
        _draw_panel(ax, runs, x_of, y_of)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(f"{y_label} vs {'time' if x_of is _seconds else 'updates'}")
        ax.grid(True, alpha=0.3)
        if y_of is _accuracy:
            _draw_targets(ax, targets)
            _draw_majority(ax, runs)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    figure.suptitle(title, fontsize="x-large")
    return figure


def write_report_png(
    runs: Sequence[Run],
    path: str | os.PathLike[str],
    *,
    targets: Sequence[float] = (),
    title: str = "fedmq runs",
) -> Path:
    """Draw `report_figure` and save it as a PNG at `path` (parent folders are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    report_figure(runs, targets=targets, title=title).savefig(out, format="png")
    return out


def _draw_panel(ax: Axes, runs: Sequence[Run], x_of: _Axis, y_of: _Metric) -> None:
    for index, run in enumerate(runs):
        xs, ys = [], []
        for point in run.points:
            value = y_of(point)
            if value is not None:
                xs.append(x_of(point))
                ys.append(value)
        # Same colour for a run in every panel, even where it has no AUC to draw.
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, color=f"C{index}", label=run.name)


def _draw_targets(ax: Axes, targets: Sequence[float]) -> None:
    for target in targets:
        ax.axhline(target, linestyle="--", linewidth=1.0, color="0.35")
        ax.annotate(
            f"target {format_target(target)}",
            xy=(1.0, target),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            fontsize="small",
            color="0.35",
        )


def _draw_majority(ax: Axes, runs: Sequence[Run]) -> None:
    """A dotted line at each distinct majority-class rate: a collapsed model sits on it."""
    rates = sorted({round(r.majority_rate, 3) for r in runs if r.majority_rate is not None})
    for rate in rates:
        ax.axhline(rate, linestyle=":", linewidth=1.4, color="C3")
        ax.annotate(
            f"majority class {rate:.3f}",
            xy=(0.0, rate),
            xycoords=("axes fraction", "data"),
            xytext=(4, 3),
            textcoords="offset points",
            ha="left",
            fontsize="small",
            color="C3",
        )
