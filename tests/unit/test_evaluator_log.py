"""The evaluator's JSONL log: one parseable report per line, resumable, robust to a torn tail."""

from __future__ import annotations

import json
from pathlib import Path

from schemas import EvalReport
from services.evaluator.eval_log import EvalLog
from services.evaluator.settings import EvaluatorSettings


def _report(version: int, task: str = "pneumonia") -> EvalReport:
    return EvalReport(
        task_id=task, version=version, loss=0.5, accuracy=0.75, auc=0.8,
        per_class_accuracy=(0.7, 0.8), num_examples=100, updates_applied=3 * version,
        model_published_at=1000.0 + version,
    )  # fmt: skip


def test_each_report_is_one_json_line_equal_to_its_json_dump(tmp_path: Path) -> None:
    log = EvalLog(tmp_path / "runs" / "pneumonia" / "eval.jsonl", task_id="pneumonia")
    reports = [_report(1), _report(2)]

    for report in reports:
        log.append(report)

    lines = log.path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [r.model_dump(mode="json") for r in reports]
    assert log.reports() == reports


def test_the_last_version_is_the_highest_logged_one(tmp_path: Path) -> None:
    log = EvalLog(tmp_path / "eval.jsonl", task_id="pneumonia")
    for version in (3, 7, 5):
        log.append(_report(version))

    assert log.last_version() == 7


def test_an_absent_log_has_no_last_version(tmp_path: Path) -> None:
    assert EvalLog(tmp_path / "nope.jsonl", task_id="pneumonia").last_version() is None


def test_a_torn_last_line_is_skipped_and_the_next_report_starts_a_new_line(tmp_path: Path) -> None:
    # Given a log whose last write was cut short by a crash
    path = tmp_path / "eval.jsonl"
    log = EvalLog(path, task_id="pneumonia")
    log.append(_report(4))
    with path.open("ab") as sink:
        sink.write(b'{"kind":"eval_report","task_id":"pneu')

    # When the evaluator resumes and appends
    assert log.last_version() == 4
    log.append(_report(6))

    # Then both whole reports are read back and the torn fragment is alone on its line
    assert [r.version for r in log.reports()] == [4, 6]
    assert len(path.read_text().splitlines()) == 3


def test_reports_of_another_task_in_the_same_file_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    EvalLog(path, task_id="derma").append(_report(50, task="derma"))
    log = EvalLog(path, task_id="pneumonia")
    log.append(_report(2))

    assert log.last_version() == 2


def test_the_default_log_path_is_under_runs_and_the_task() -> None:
    settings = EvaluatorSettings(task_id="derma")

    assert settings.resolved_log_path == Path("runs/derma/eval.jsonl")
    assert EvaluatorSettings(log_path=Path("x.jsonl")).resolved_log_path == Path("x.jsonl")
