"""Eval logs (`eval.jsonl`, one `EvalReport` JSON object per line) and loading a whole run."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Run:
    """A run directory read into memory: its manifest and its evaluations in time order."""

    path: Path
    manifest: RunManifest
    points: tuple[EvalPoint, ...]

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
        )
        for report in reports
        if report.split == split
    ]
    return tuple(sorted(points, key=lambda point: point.seconds))


def load_run(run_dir: str | os.PathLike[str], *, split: str = "test") -> Run:
    """Read `<run_dir>/run.json` and `<run_dir>/eval.jsonl`, keeping the evaluations of `split`.

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
    return Run(path=directory, manifest=manifest, points=points)


def _weights_time(report: EvalReport) -> float:
    if report.model_published_at is not None:
        return report.model_published_at
    return report.evaluated_at
