"""The evaluator against a fake aggregator: evaluates due versions, logs them, resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import EvalReport, GlobalModel, Heartbeat, Tensor
from services.common.bus import InMemoryBus
from services.common.topology import follower_queue_name
from services.common.training import evaluate
from services.evaluator.eval_log import EvalLog
from services.evaluator.service import EvaluatorService
from services.evaluator.settings import EvaluatorSettings
from services.trainer.backoff import Backoff
from services.trainer.service import EXIT_OK
from tests.unit.test_trainer_support import (
    TASK,
    Background,
    FakeAggregator,
    global_model,
    tiny_dataset,
    tiny_spec,
    wait_until,
)

FOLLOWER = follower_queue_name(TASK, "evaluator")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _evaluator(
    bus: InMemoryBus, log_path: Path, clock: _Clock | None = None, **fields: Any
) -> EvaluatorService:
    fields.setdefault("checkpoint_dir", log_path.parent / "checkpoints")
    settings = EvaluatorSettings(task_id=TASK, log_path=log_path, join_timeout=5.0, **fields)
    return EvaluatorService(
        settings, bus=bus, dataset=tiny_dataset(40, seed=9), clock=clock or _Clock(),
        backoff=Backoff(initial=0.01, maximum=0.02), poll_interval=0.01,
    )  # fmt: skip


def _model(version: int) -> GlobalModel:
    return global_model(tiny_spec(), version, seed=version).model_copy(
        update={"updates_applied": 10 * version, "published_at": 5000.0 + version}
    )


def _publish_and_wait_taken(bus: InMemoryBus, aggregator: FakeAggregator, version: int) -> None:
    aggregator.publish_model(_model(version))
    wait_until(lambda: bus.queue_depth(FOLLOWER) == 0)


def _logged_versions(path: Path) -> list[int]:
    return [json.loads(line)["version"] for line in path.read_text().splitlines()]


def test_the_evaluator_reports_the_joined_model_in_its_log_and_on_the_events_exchange(
    tmp_path: Path,
) -> None:
    # Given an aggregator at version 3
    bus = InMemoryBus()
    aggregator = FakeAggregator(bus, tiny_spec(), _model(3))
    evaluator = _evaluator(bus, tmp_path / "eval.jsonl")

    # When the evaluator starts
    running = Background(evaluator.run)
    wait_until(lambda: evaluator.reports_written == 1)
    evaluator.stop()

    # Then it joined as an evaluator and reported version 3 both ways
    assert running.join() == EXIT_OK
    [join] = aggregator.joins
    assert (join.role, join.num_examples, join.trainer_id) == ("evaluator", 0, "evaluator")
    [logged] = EvalLog(tmp_path / "eval.jsonl", task_id=TASK).reports()
    [published] = aggregator.events(EvalReport)
    assert published == logged
    assert logged.version == 3
    assert logged.updates_applied == 30
    assert logged.model_published_at == 5003.0
    assert logged.num_examples == 40
    assert logged.split == "val"
    assert 0.0 <= logged.accuracy <= 1.0 and logged.loss > 0
    assert len(logged.per_class_accuracy) == 2
    assert logged.auc is not None
    assert any(b.role == "evaluator" for b in aggregator.events(Heartbeat))


def test_only_every_n_th_version_is_evaluated(tmp_path: Path) -> None:
    # Given an evaluator of every 2nd version, joined at version 3
    bus = InMemoryBus()
    aggregator = FakeAggregator(bus, tiny_spec(), _model(3))
    evaluator = _evaluator(bus, tmp_path / "eval.jsonl", every_n_versions=2)
    running = Background(evaluator.run)
    wait_until(lambda: evaluator.reports_written == 1)

    # When versions 4, 5 and 6 are published one after the other
    for version in (4, 5, 6):
        _publish_and_wait_taken(bus, aggregator, version)
    wait_until(lambda: evaluator.reports_written == 2)
    evaluator.stop()

    # Then 3 and 5 were evaluated, 4 and 6 not
    assert running.join() == EXIT_OK
    assert _logged_versions(tmp_path / "eval.jsonl") == [3, 5]
    assert [r.version for r in aggregator.events(EvalReport)] == [3, 5]


def test_a_version_arriving_within_min_interval_waits_and_the_newest_one_is_evaluated(
    tmp_path: Path,
) -> None:
    # Given an evaluator that evaluates at most every 100 s, which just did version 1
    bus = InMemoryBus()
    aggregator = FakeAggregator(bus, tiny_spec(), _model(1))
    clock = _Clock()
    evaluator = _evaluator(bus, tmp_path / "eval.jsonl", clock, min_interval=100.0)
    running = Background(evaluator.run)
    wait_until(lambda: evaluator.reports_written == 1)

    # When versions 2 and 3 arrive 10 s later, and then the interval passes
    clock.now = 10.0
    _publish_and_wait_taken(bus, aggregator, 2)
    _publish_and_wait_taken(bus, aggregator, 3)
    assert evaluator.reports_written == 1
    clock.now = 101.0
    wait_until(lambda: evaluator.reports_written == 2)
    evaluator.stop()

    # Then only the newest waiting version was evaluated
    assert running.join() == EXIT_OK
    assert _logged_versions(tmp_path / "eval.jsonl") == [1, 3]


def test_a_restarted_evaluator_does_not_evaluate_logged_or_older_versions_again(
    tmp_path: Path,
) -> None:
    # Given a log that already holds versions 1 to 5, and an aggregator at version 5
    path = tmp_path / "eval.jsonl"
    first_bus = InMemoryBus()
    aggregator = FakeAggregator(first_bus, tiny_spec(), _model(1))
    first = _evaluator(first_bus, path)
    running = Background(first.run)
    wait_until(lambda: first.reports_written == 1)
    for version in (2, 3, 4, 5):
        _publish_and_wait_taken(first_bus, aggregator, version)
    wait_until(lambda: first.reports_written == 5)
    first.stop()
    assert running.join() == EXIT_OK

    # When a new evaluator process starts and is offered 5, then 4, then 6
    bus = InMemoryBus()
    aggregator = FakeAggregator(bus, tiny_spec(), _model(5))
    second = _evaluator(bus, path)
    running = Background(second.run)
    wait_until(lambda: len(aggregator.joins) == 1)
    _publish_and_wait_taken(bus, aggregator, 4)
    _publish_and_wait_taken(bus, aggregator, 6)
    wait_until(lambda: second.reports_written == 1)
    second.stop()

    # Then only version 6 was evaluated again
    assert running.join() == EXIT_OK
    assert _logged_versions(path) == [1, 2, 3, 4, 5, 6]
    assert [r.version for r in aggregator.events(EvalReport)] == [6]


def test_a_stop_during_an_evaluation_still_logs_that_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an evaluation during which SIGTERM arrives
    bus = InMemoryBus()
    FakeAggregator(bus, tiny_spec(), _model(2))
    evaluator = _evaluator(bus, tmp_path / "eval.jsonl")

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        evaluator.stop()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr("services.evaluator.service.evaluate", interrupted)

    # When it runs
    code = Background(evaluator.run).join()

    # Then the evaluation in progress was finished and logged, and it exited cleanly
    assert code == EXIT_OK
    assert _logged_versions(tmp_path / "eval.jsonl") == [2]


def test_a_model_that_cannot_be_evaluated_is_logged_as_an_error_and_the_next_one_is_evaluated(
    tmp_path: Path,
) -> None:
    # Given a published model whose BatchNorm variance is negative (its outputs are NaN)
    broken = _model(1)
    tensors = tuple(
        Tensor.from_numpy(t.name, -np.ones(t.shape, np.float32))
        if t.name.endswith("running_var")
        else t
        for t in broken.tensors
    )
    bus = InMemoryBus()
    aggregator = FakeAggregator(bus, tiny_spec(), broken.model_copy(update={"tensors": tensors}))
    evaluator = _evaluator(bus, tmp_path / "eval.jsonl")
    running = Background(evaluator.run)
    wait_until(lambda: len(aggregator.joins) == 1)

    # When a sound version 2 follows
    _publish_and_wait_taken(bus, aggregator, 2)
    wait_until(lambda: evaluator.reports_written == 1)
    evaluator.stop()

    # Then the evaluator survived the broken version and reported only the sound one
    assert running.join() == EXIT_OK
    assert _logged_versions(tmp_path / "eval.jsonl") == [2]


def test_each_version_is_scored_on_val_and_test_and_the_best_on_val_is_kept_once(
    tmp_path: Path,
) -> None:
    # Given an evaluator with val and test data, keeping the best version in checkpoints/best
    from services.aggregator.best import history, load_best

    bus = InMemoryBus()
    aggregator = FakeAggregator(bus, tiny_spec(), _model(1))
    settings = EvaluatorSettings(
        task_id=TASK, log_path=tmp_path / "eval.jsonl", join_timeout=5.0,
        checkpoint_dir=tmp_path / "checkpoints",
    )  # fmt: skip
    evaluator = EvaluatorService(
        settings, bus=bus, dataset=tiny_dataset(40, seed=9), test_dataset=tiny_dataset(30, seed=4),
        clock=_Clock(), backoff=Backoff(initial=0.01, maximum=0.02), poll_interval=0.01,
    )  # fmt: skip

    # When versions 1 to 3 are evaluated
    running = Background(evaluator.run)
    wait_until(lambda: evaluator.reports_written == 1)
    for version in (2, 3):
        _publish_and_wait_taken(bus, aggregator, version)
    wait_until(lambda: evaluator.reports_written == 3)
    evaluator.stop()
    assert running.join() == EXIT_OK

    # Then every version has a val and a test report, and the kept best version is the one
    # with the highest val balanced accuracy, selected once per improvement
    reports = EvalLog(tmp_path / "eval.jsonl", task_id=TASK).reports()
    assert [(r.version, r.split) for r in reports] == [
        (v, s) for v in (1, 2, 3) for s in ("val", "test")
    ]
    val = [r for r in reports if r.split == "val"]
    best = load_best(tmp_path / "checkpoints" / TASK)
    assert best is not None
    scored = [(sum(r.per_class_accuracy) / 2, r.auc or 0.0, -r.loss, r.version) for r in val]
    assert best.version == max(scored)[3]
    assert best.test is not None and best.test["num_examples"] == 30
    improvements = [h["version"] for h in history(tmp_path / "checkpoints" / TASK)]
    assert improvements[-1] == best.version
    assert len(improvements) == len(set(improvements))
