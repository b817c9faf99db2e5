"""`report.md` + `report.png` for a set of run directories: the pieces put together."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.report.logs import Run, load_run
from services.report.plots import write_report_png
from services.report.summary import RunSummary, summarize
from services.report.tables import markdown_table

REPORT_MARKDOWN = "report.md"
REPORT_PNG = "report.png"
DEFAULT_TITLE = "fedmq: test accuracy and AUC"

_NOTES = """\
- *time to X*: seconds from the run's start (`started_at` in `run.json`) to the moment the
  first model version whose test accuracy is at least X was published (evaluation time when
  the report has no publication time); *updates to X*: updates applied at that version.
- *updates* are client updates applied by the aggregator in federated runs and optimizer
  steps in centralized runs: compare them within a kind, and compare kinds by time.
- Scores are on the `{split}` split; *final* is the last evaluation of the run.
- *val-selected*: the version with the highest balanced accuracy on the `val` split (ties:
  AUC, then loss), the one the evaluator keeps as `best`; its `{split}` scores are the
  result to quote. *last 30 s*: mean and minimum over the evaluations of the last 30 s.
- *best test acc (optimistic bound)*: the maximum over every version on `{split}` itself;
  choosing a version by its test score overfits the test set, so it is a bound, not a result.
- *majority-class rate*: the accuracy of always answering the most frequent class (the
  dotted line in the plots): a version at or below it has collapsed to one class.
"""


@dataclass(frozen=True)
class Report:
    """What `write_report` produced."""

    runs: tuple[Run, ...]
    summaries: tuple[RunSummary, ...]
    markdown_path: Path
    png_path: Path


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    targets: Sequence[float] = (),
    split: str = "test",
    title: str = DEFAULT_TITLE,
) -> Report:
    """Load every run (all must be readable, else `RunLogError`), then write both files."""
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = tuple(load_run(run_dir, split=split) for run_dir in run_dirs)
    summaries = tuple(summarize(run, targets) for run in runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png_path = write_report_png(runs, out / REPORT_PNG, targets=targets, title=title)
    markdown_path = out / REPORT_MARKDOWN
    markdown_path.write_text(
        report_markdown(runs, summaries, targets, title=title, split=split), encoding="utf-8"
    )
    return Report(runs, summaries, markdown_path, png_path)


def report_markdown(
    runs: Sequence[Run],
    summaries: Sequence[RunSummary],
    targets: Sequence[float],
    *,
    title: str = DEFAULT_TITLE,
    split: str = "test",
) -> str:
    """The Markdown document: table, notes, the runs' directories and the figure."""
    sources = "\n".join(f"- `{run.name}`: `{run.path}`" for run in runs)
    return (
        f"# {title}\n\n{markdown_table(summaries, targets)}\n"
        f"{_NOTES.format(split=split)}\nRuns:\n\n{sources}\n\n![report]({REPORT_PNG})\n"
    )
