"""`fedmq report RUN_DIR [RUN_DIR ...] --out DIR`: plots and a table comparing runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_TARGETS = (0.80, 0.85)


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add the `report` sub-command."""
    parser = subcommands.add_parser(
        "report",
        help="plot and tabulate the eval logs of runs",
        description=(
            "Read run directories (run.json + eval.jsonl) and write DIR/report.png "
            "(accuracy and AUC vs time and vs updates) and DIR/report.md (time and "
            "updates to each target accuracy, best and final scores)."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the report")
    parser.add_argument(
        "--targets",
        nargs="*",
        type=_probability,
        default=list(DEFAULT_TARGETS),
        metavar="ACC",
        help="target test accuracies (default: %(default)s)",
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--title", default=None, help="figure and document title")
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Write the report, print the table; exit code 2 when a run cannot be read."""
    from rich.console import Console

    from services.report.errors import RunLogError
    from services.report.tables import rich_table
    from services.report.writer import DEFAULT_TITLE, write_report

    title = args.title or DEFAULT_TITLE
    try:
        report = write_report(
            args.run_dirs, args.out, targets=args.targets, split=args.split, title=title
        )
    except RunLogError as error:
        print(f"fedmq report: {error}", file=sys.stderr)
        return 2
    console = Console()
    console.print(rich_table(report.summaries, args.targets, title=title))
    console.print(f"wrote {report.markdown_path} and {report.png_path}")
    return 0


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a target accuracy is in [0, 1], got {text}")
    return value
