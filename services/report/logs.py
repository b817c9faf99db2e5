"""Eval logs (`eval.jsonl`, one `EvalReport` JSON object per line) and loading a whole run."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from schemas import EvalReport
from services.report.errors import EmptyRunLog, InvalidRunLog, RunNotFound
from services.report.manifest import MANIFEST_FILE, RunManifest, read_manifest

EVAL_LOG_FILE = "eval.jsonl"
"""Name of the eval log inside a run directory."""


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation placed on the run's axes."""

    seconds: float
    """Since the run started, at the moment the evaluated weights existed (see `load_run`)."""
    updates: int
    version: int
    accuracy: float
    auc: float | None
    loss: float
    per_class_accuracy: tuple[float, ...] = ()

    @property
    def balanced_accuracy(self) -> float:
        """Mean per-class recall; the accuracy when per-class recalls are absent."""
        per_class = self.per_class_accuracy
        return sum(per_class) / len(per_class) if per_class else self.accuracy


@dataclass(frozen=True)
class Run:
    """A run directory read into memory: its manifest and its evaluations in time order.

    `points` are on the reported split (`test`); `selection_points` on the split versions
    are selected by (`val`; empty when the log has none, e.g. centralized or study runs);
    `class_rates` are the reported split's class frequencies inferred from its reports
    (None when they cannot be told, see `class_rates`).
    """

    path: Path
    manifest: RunManifest
    points: tuple[EvalPoint, ...]
    selection_points: tuple[EvalPoint, ...] = ()
    class_rates: tuple[float, ...] | None = None

    @property
    def majority_rate(self) -> float | None:
        """Accuracy of always answering the most frequent class of the reported split."""
        return None if self.class_rates is None else max(self.class_rates)

    @property
    def name(self) -> str:
        """The label of the run (the manifest's name)."""
        return self.manifest.name


def append_eval_report(path: str | os.PathLike[str], report: EvalReport) -> None:
    """Append `report` as one JSON line and flush it to disk (readers may follow the file)."""
    line = json.dumps(report.model_dump(mode="json"), separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as sink:
        sink.write(line)
        sink.flush()
        os.fsync(sink.fileno())


def read_eval_log(path: str | os.PathLike[str]) -> list[EvalReport]:
    """Every `EvalReport` of a JSONL log, in file order; blank lines are skipped.

    A last line without its newline that does not parse is a write in progress (the
    evaluator appends while we read) and is ignored; any other bad line raises
    `InvalidRunLog` naming the file and line number. A missing file raises `RunNotFound`.
    """
    log = Path(path)
    try:
        text = log.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise RunNotFound(
            f"{log} not found: the evaluator (or `fedmq centralized`) writes it there"
        ) from error
    lines = text.split("\n")
    reports: list[EvalReport] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            reports.append(EvalReport.model_validate_json(line))
        except ValidationError as error:
            if number == len(lines):  # no trailing newline: an append in progress
                break
            raise InvalidRunLog(f"{log}:{number}: not an EvalReport: {error}") from error
    return reports


def points_from_reports(
    reports: Iterable[EvalReport], *, started_at: float, split: str = "test"
) -> tuple[EvalPoint, ...]:
    """The reports of `split` as points on the run's axes, ordered by time (stable)."""
    points = [
        EvalPoint(
            seconds=_weights_time(report) - started_at,
            updates=report.updates_applied,
            version=report.version,
            accuracy=report.accuracy,
            auc=report.auc,
            loss=report.loss,
            per_class_accuracy=tuple(report.per_class_accuracy),
        )
        for report in reports
        if report.split == split
    ]
    return tuple(sorted(points, key=lambda point: point.seconds))


def class_rates(points: Iterable[EvalPoint]) -> tuple[float, ...] | None:
    """The class frequencies of the evaluated split, solved from its reports.

    Every report satisfies `accuracy = sum_c recall_c * rate_c` with `sum_c rate_c = 1`, so
    reports whose per-class recalls differ pin the rates down (least squares). None when the
    reports cannot tell them apart (no per-class recalls, or every version equally good on
    every class).
    """
    rows = [(p.per_class_accuracy, p.accuracy) for p in points if p.per_class_accuracy]
    if not rows:
        return None
    classes = len(rows[0][0])
    rows = [(recalls, accuracy) for recalls, accuracy in rows if len(recalls) == classes]
    matrix = np.array([list(recalls) for recalls, _ in rows] + [[1.0] * classes])
    target = np.array([accuracy for _, accuracy in rows] + [1.0])
    if np.linalg.matrix_rank(matrix) < classes:
        return None
    solution, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    rates = np.clip(solution, 0.0, 1.0)
    return tuple(float(r) for r in rates / rates.sum())


def load_run(
    run_dir: str | os.PathLike[str], *, split: str = "test", selection_split: str = "val"
) -> Run:
    """Read `<run_dir>/run.json` and `<run_dir>/eval.jsonl`, keeping the evaluations of `split`
    (and those of `selection_split`, by which a version is selected).

    A point's time is the model's publication time when the report carries one, else its
    evaluation time: time-to-accuracy then measures training, not evaluator lag.
    Raises `RunNotFound`, `InvalidRunLog` or `EmptyRunLog` (all `RunLogError`).
    """
    directory = Path(run_dir)
    if not directory.is_dir():
        raise RunNotFound(
            f"run directory {directory} does not exist "
            f"(expected {MANIFEST_FILE} and {EVAL_LOG_FILE} in it)"
        )
    manifest = read_manifest(directory)
    log = directory / EVAL_LOG_FILE
    reports = read_eval_log(log)
    if not reports:
        raise EmptyRunLog(f"{log} holds no evaluation yet")
    points = points_from_reports(reports, started_at=manifest.started_at, split=split)
    if not points:
        found = sorted({report.split for report in reports})
        raise EmptyRunLog(f"{log} holds no evaluation on the {split!r} split (found: {found})")
    selection = (
        points_from_reports(reports, started_at=manifest.started_at, split=selection_split)
        if selection_split != split
        else ()
    )
    return Run(
        path=directory,
        manifest=manifest,
        points=points,
        selection_points=selection,
        class_rates=class_rates(points),
    )


def _weights_time(report: EvalReport) -> float:
    if report.model_published_at is not None:
        return report.model_published_at
    return report.evaluated_at
