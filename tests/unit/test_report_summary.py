"""Reading run directories and the report's numbers, on a hand-written eval log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest

from schemas import EvalReport
from services.report import (
    EmptyRunLog,
    InvalidRunLog,
    RunManifest,
    RunNotFound,
    append_eval_report,
    load_run,
    read_eval_log,
    read_manifest,
    summarize,
    time_to_reach,
    updates_to_reach,
    write_manifest,
)

STARTED_AT = 1_000.0
TARGETS = (0.80, 0.84, 0.90)

# (version, accuracy, auc, updates applied, model published at, evaluated at)
FEDERATED_LOG: tuple[tuple[int, float, float, int, float | None, float], ...] = (
    (0, 0.5000, 0.6000, 0, 1_000.0, 1_001.0),
    (1, 0.7500, 0.8000, 10, 1_012.5, 1_013.0),
    (2, 0.8000, 0.9000, 20, 1_025.0, 1_026.0),  # reaches 0.80 exactly: 25.0 s, 20 updates
    (3, 0.8450, 0.9500, 30, None, 1_037.5),  # no publication time: 37.5 s from evaluated_at
    (4, 0.8125, 0.9375, 40, 1_050.0, 1_051.0),
)


def eval_report(
    version: int,
    accuracy: float,
    auc: float | None,
    updates: int,
    published_at: float | None,
    evaluated_at: float,
    *,
    split: Literal["train", "val", "test"] = "test",
) -> EvalReport:
    return EvalReport(
        task_id="pneumonia",
        version=version,
        split=split,
        loss=1.0 - accuracy,
        accuracy=accuracy,
        auc=auc,
        per_class_accuracy=(accuracy, accuracy),
        num_examples=624,
        updates_applied=updates,
        model_published_at=published_at,
        evaluated_at=evaluated_at,
    )


def write_federated_run(run_dir: Path, *, name: str = "fedbuff-4") -> Path:
    """A federated run whose log also holds a val evaluation the report must ignore."""
    write_manifest(
        run_dir,
        RunManifest(
            name=name, kind="federated", strategy="fedbuff", model="cnn-small",
            started_at=STARTED_AT, config={"trainers": 4},
        ),
    )  # fmt: skip
    log = run_dir / "eval.jsonl"
    for row in FEDERATED_LOG[:3]:
        append_eval_report(log, eval_report(*row))
    append_eval_report(log, eval_report(4, 0.99, 0.99, 40, 1_050.0, 1_051.0, split="val"))
    for row in FEDERATED_LOG[3:]:
        append_eval_report(log, eval_report(*row))
    return run_dir


def test_manifest_round_trips_through_run_json(tmp_path: Path) -> None:
    # Given
    manifest = RunManifest(
        name="central", kind="centralized", model="resnet18", started_at=12.5,
        config={"lr": 0.01, "epochs": 2},
    )  # fmt: skip
    # When
    path = write_manifest(tmp_path / "run", manifest)
    # Then
    assert path == tmp_path / "run" / "run.json"
    assert json.loads(path.read_text())["kind"] == "centralized"
    assert read_manifest(tmp_path / "run") == manifest
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.json"]  # no temp file left


def test_eval_log_lines_parse_back_into_the_reports_written(tmp_path: Path) -> None:
    # Given
    reports = [eval_report(*row) for row in FEDERATED_LOG]
    log = tmp_path / "eval.jsonl"
    # When
    for report in reports:
        append_eval_report(log, report)
    # Then
    assert read_eval_log(log) == reports
    assert len(log.read_text().splitlines()) == len(reports)


def test_points_are_timed_from_publication_else_evaluation_and_other_splits_are_dropped(
    tmp_path: Path,
) -> None:
    # When
    run = load_run(write_federated_run(tmp_path / "fed"))
    # Then
    assert run.name == "fedbuff-4"
    assert [p.seconds for p in run.points] == [0.0, 12.5, 25.0, 37.5, 50.0]
    assert [p.updates for p in run.points] == [0, 10, 20, 30, 40]
    assert max(p.accuracy for p in run.points) == 0.845  # the val line's 0.99 is not there


def test_time_and_updates_to_target_are_those_of_the_first_evaluation_reaching_it(
    tmp_path: Path,
) -> None:
    # Given
    points = load_run(write_federated_run(tmp_path / "fed")).points
    # Then: 0.80 is reached exactly at v2, 0.84 at v3 (which has no publication time)
    assert time_to_reach(points, 0.80) == 25.0
    assert updates_to_reach(points, 0.80) == 20
    assert time_to_reach(points, 0.84) == 37.5
    assert updates_to_reach(points, 0.84) == 30
    assert time_to_reach(points, 0.90) is None
    assert updates_to_reach(points, 0.90) is None
    assert time_to_reach(points, 0.0) == 0.0


def test_summary_has_best_final_and_per_target_numbers_of_the_log(tmp_path: Path) -> None:
    # When
    summary = summarize(load_run(write_federated_run(tmp_path / "fed")), TARGETS)
    # Then
    assert (summary.name, summary.kind, summary.strategy, summary.model) == (
        "fedbuff-4", "federated", "fedbuff", "cnn-small",
    )  # fmt: skip
    assert summary.evaluations == 5
    assert (summary.best_accuracy, summary.best_auc) == (0.845, 0.95)
    assert (summary.final_accuracy, summary.final_auc) == (0.8125, 0.9375)
    assert (summary.final_seconds, summary.final_updates) == (50.0, 40)
    assert [(t.target, t.seconds, t.updates) for t in summary.targets] == [
        (0.80, 25.0, 20), (0.84, 37.5, 30), (0.90, None, None),
    ]  # fmt: skip


def test_summary_of_a_run_without_auc_reports_none(tmp_path: Path) -> None:
    # Given
    write_manifest(tmp_path, RunManifest(name="r", kind="centralized", model="m", started_at=0.0))
    append_eval_report(tmp_path / "eval.jsonl", eval_report(0, 0.7, None, 3, None, 4.0))
    # When
    summary = summarize(load_run(tmp_path))
    # Then
    assert summary.best_auc is None
    assert summary.final_auc is None
    assert summary.final_seconds == 4.0


def test_a_missing_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunNotFound, match=r"run directory .*nowhere does not exist"):
        load_run(tmp_path / "nowhere")


def test_a_run_without_manifest_is_a_clear_error(tmp_path: Path) -> None:
    # Given
    append_eval_report(tmp_path / "eval.jsonl", eval_report(*FEDERATED_LOG[0]))
    # Then
    with pytest.raises(RunNotFound, match=r"run\.json not found"):
        load_run(tmp_path)


def test_a_run_without_eval_log_is_a_clear_error(tmp_path: Path) -> None:
    # Given
    write_manifest(tmp_path, RunManifest(name="r", kind="federated", model="m", started_at=0.0))
    # Then
    with pytest.raises(RunNotFound, match=r"eval\.jsonl not found"):
        load_run(tmp_path)


def test_an_empty_eval_log_is_a_clear_error(tmp_path: Path) -> None:
    # Given
    write_manifest(tmp_path, RunManifest(name="r", kind="federated", model="m", started_at=0.0))
    (tmp_path / "eval.jsonl").write_text("\n\n")
    # Then
    with pytest.raises(EmptyRunLog, match="holds no evaluation yet"):
        load_run(tmp_path)


def test_a_log_without_the_requested_split_names_the_splits_it_has(tmp_path: Path) -> None:
    # Given
    write_manifest(tmp_path, RunManifest(name="r", kind="federated", model="m", started_at=0.0))
    append_eval_report(tmp_path / "eval.jsonl", eval_report(0, 0.5, 0.5, 0, None, 1.0, split="val"))
    # Then
    with pytest.raises(
        EmptyRunLog, match=r"no evaluation on the 'test' split \(found: \['val'\]\)"
    ):
        load_run(tmp_path)


def test_a_malformed_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    # Given
    log = tmp_path / "eval.jsonl"
    append_eval_report(log, eval_report(*FEDERATED_LOG[0]))
    with log.open("a") as sink:
        sink.write('{"accuracy": 2.0}\n')
    append_eval_report(log, eval_report(*FEDERATED_LOG[1]))
    # Then
    with pytest.raises(InvalidRunLog, match=r"eval\.jsonl:2: not an EvalReport"):
        read_eval_log(log)


def test_a_half_written_last_line_is_ignored_as_an_append_in_progress(tmp_path: Path) -> None:
    # Given
    log = tmp_path / "eval.jsonl"
    append_eval_report(log, eval_report(*FEDERATED_LOG[0]))
    with log.open("a") as sink:
        sink.write('{"kind": "eval_report", "task_id": "pneu')
    # When
    reports = read_eval_log(log)
    # Then
    assert [r.version for r in reports] == [0]


def test_an_invalid_manifest_is_a_clear_error(tmp_path: Path) -> None:
    # Given
    (tmp_path / "run.json").write_text('{"name": "r", "kind": "sideways"}')
    # Then
    with pytest.raises(InvalidRunLog, match=r"run\.json is not a valid run manifest"):
        read_manifest(tmp_path)


def _recalls_report(
    version: int, recalls: tuple[float, float], seconds: float, *, split: str
) -> EvalReport:
    # Test split rates 0.375 / 0.625 (PneumoniaMNIST's test split: 234 normal, 390 pneumonia).
    rates = (0.375, 0.625) if split == "test" else (0.25, 0.75)
    accuracy = recalls[0] * rates[0] + recalls[1] * rates[1]
    return EvalReport.model_validate(
        {
            "task_id": "pneumonia", "version": version, "split": split, "loss": 1.0 - accuracy,
            "accuracy": accuracy, "auc": 0.9 + version / 100, "per_class_accuracy": recalls,
            "num_examples": 624, "updates_applied": 4 * version,
            "model_published_at": STARTED_AT + seconds, "evaluated_at": STARTED_AT + seconds + 1,
        }
    )  # fmt: skip


def test_the_honest_columns_are_computed_from_a_hand_made_log_with_val_and_test(
    tmp_path: Path,
) -> None:
    # Given a log where the best version on test (3) is not the best on val (4), version 1
    # predicts one class only, and every version has a val and a test report
    write_manifest(
        tmp_path,
        RunManifest(name="fed", kind="federated", model="cnn-small", started_at=STARTED_AT),
    )
    rows = [  # version, val recalls, test recalls, seconds
        (1, (0.0, 1.0), (0.0, 1.0), 0.0),
        (2, (0.85, 0.9), (0.8, 0.9), 20.0),
        (3, (0.8, 0.9), (0.9, 0.95), 40.0),
        (4, (0.95, 0.9), (0.6, 0.98), 60.0),
    ]
    for version, val, test, seconds in rows:
        append_eval_report(
            tmp_path / "eval.jsonl", _recalls_report(version, val, seconds, split="val")
        )
        append_eval_report(
            tmp_path / "eval.jsonl", _recalls_report(version, test, seconds, split="test")
        )

    # When it is summarised
    summary = summarize(load_run(tmp_path))

    # Then the selected version is the best on val (balanced accuracy 0.925), scored on test;
    # the last 30 s hold versions 3 and 4; the best on test is only the optimistic bound
    assert summary.selected_version == 4
    assert summary.selected_val_score == pytest.approx(0.925)
    assert summary.selected_accuracy == pytest.approx(0.375 * 0.6 + 0.625 * 0.98)
    assert summary.selected_auc == pytest.approx(0.94)
    assert summary.final_accuracy == pytest.approx(0.8375)
    assert summary.tail_mean_accuracy == pytest.approx((0.93125 + 0.8375) / 2)
    assert summary.tail_min_accuracy == pytest.approx(0.8375)
    assert summary.tail_mean_auc == pytest.approx((0.93 + 0.94) / 2)
    assert summary.best_accuracy == pytest.approx(0.93125)
    assert summary.majority_rate == pytest.approx(0.625)


def test_the_majority_rate_is_unknown_when_no_report_tells_the_classes_apart(
    tmp_path: Path,
) -> None:
    # Given reports whose recalls are equal on both classes
    run = load_run(write_federated_run(tmp_path))
    # Then the class rates cannot be solved for
    assert run.class_rates is None and summarize(run).majority_rate is None
