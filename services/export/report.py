"""How `fedmq predict` shows its results: a table for people, JSON or CSV for machines."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import TextIO

from services.export.predict import Outcome

PROBABILITY_DIGITS = 6
TABLE_WIDTH_WHEN_PIPED = 160


def write_predictions(
    outcome: Outcome, class_names: Sequence[str], fmt: str, stream: TextIO
) -> None:
    """Write the predictions (not the failures) to `stream` as `table`, `json` or `csv`."""
    if fmt == "json":
        _write_json(outcome, class_names, stream)
    elif fmt == "csv":
        _write_csv(outcome, class_names, stream)
    else:
        _write_table(outcome, class_names, stream)


def print_failures(outcome: Outcome, stream: TextIO) -> None:
    """One line per input that could not be classified, then a count."""
    for failure in outcome.failures:
        print(f"fedmq predict: {failure.path}: {failure.reason}", file=stream)
    if outcome.failures:
        done = len(outcome.predictions)
        print(f"fedmq predict: {len(outcome.failures)} failed, {done} classified", file=stream)


def _write_json(outcome: Outcome, class_names: Sequence[str], stream: TextIO) -> None:
    document = {
        "predictions": [
            {
                "file": str(p.path),
                "class": p.label,
                "class_index": p.index,
                "probabilities": dict(zip(class_names, p.probabilities, strict=True)),
                "notes": list(p.notes),
            }
            for p in outcome.predictions
        ],
        "failures": [{"file": str(f.path), "error": f.reason} for f in outcome.failures],
    }
    json.dump(document, stream, indent=2)
    stream.write("\n")


def _write_csv(outcome: Outcome, class_names: Sequence[str], stream: TextIO) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["file", "class", *(f"p_{name}" for name in class_names), "notes"])
    for p in outcome.predictions:
        row = [f"{v:.{PROBABILITY_DIGITS}f}" for v in p.probabilities]
        writer.writerow([str(p.path), p.label, *row, "; ".join(p.notes)])


def _write_table(outcome: Outcome, class_names: Sequence[str], stream: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(outcome.predictions)} images classified", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("class")
    for name in class_names:
        table.add_column(f"p({name})", justify="right")
    table.add_column("notes", overflow="fold")
    for p in outcome.predictions:
        probabilities = (f"{v:.4f}" for v in p.probabilities)
        table.add_row(str(p.path), p.label, *probabilities, "; ".join(p.notes))
    # Piped output is not cut at 80 columns: file names stay whole.
    width = None if stream.isatty() else TABLE_WIDTH_WHEN_PIPED
    Console(file=stream, width=width).print(table)
