"""The evaluator's JSONL log: one `EvalReport` per line, durable per line, readable on restart.

`fedmq report` reads it; the evaluator itself reads it back to resume where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from schemas import EvalReport


class EvalLog:
    """Append-only JSONL file of the reports of one task."""

    def __init__(self, path: Path, *, task_id: str) -> None:
        self.path = path
        self._task_id = task_id
        self._log = structlog.get_logger(__name__).bind(task=task_id, path=str(path))

    def reports(self) -> list[EvalReport]:
        """Every readable report of this task, in file order.

        A line that does not parse (a torn write after a crash, an edit by hand) is
        skipped with a warning rather than stopping the evaluator.
        """
        if not self.path.exists():
            return []
        reports = []
        with self.path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                report = self._parse(line, number)
                if report is not None and report.task_id == self._task_id:
                    reports.append(report)
        return reports

    def last_version(self) -> int | None:
        """The newest version already evaluated, or None for an empty or absent log."""
        return max((r.version for r in self.reports()), default=None)

    def append(self, report: EvalReport) -> None:
        """Write `report` as one line and make it durable (flush + fsync) before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        line = json.dumps(report.model_dump(mode="json"), separators=(",", ":")) + "\n"
        with self.path.open("ab") as sink:
            if _ends_mid_line(self.path):
                sink.write(b"\n")  # a torn last line stays alone on its line
            sink.write(line.encode())
            sink.flush()
            os.fsync(sink.fileno())
        if created:
            _fsync_directory(self.path.parent)

    def _parse(self, line: bytes, number: int) -> EvalReport | None:
        if not line.strip():
            return None
        try:
            return EvalReport.model_validate(json.loads(line))
        except ValueError as error:  # bad JSON, bad UTF-8 and pydantic's ValidationError
            self._log.warning(
                "unreadable line in the eval log skipped", line=number, error=str(error)[:200]
            )
            return None


def _ends_mid_line(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb") as source:
        source.seek(size - 1)
        return source.read(1) != b"\n"


def _fsync_directory(directory: Path) -> None:
    # The new file's name is durable only once its directory is.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
