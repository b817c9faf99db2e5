"""`fedmq aggregator` without a task file: the flags build the task and its strategy."""

from __future__ import annotations

import pytest

from services.aggregator.cli import settings_from_args, task_from_args
from services.aggregator.task import TaskDefinition
from services.cli import build_parser


def _task(*flags: str, monkeypatch: pytest.MonkeyPatch) -> TaskDefinition:
    monkeypatch.delenv("FEDMQ_TASK_FILE", raising=False)
    args = build_parser().parse_args(["aggregator", *flags])
    return task_from_args(args, settings_from_args(args))


def test_strategy_flags_reach_the_strategy_and_the_rest_keeps_its_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = _task(
        "--strategy", "fedbuff", "--buffer-size", "4", "--server-lr", "0.5", "--lr", "0.003",
        "--uniform-weights", monkeypatch=monkeypatch,
    )  # fmt: skip
    strategy = task.strategy
    assert (strategy.name, strategy.buffer_size, strategy.server_lr) == ("fedbuff", 4, 0.5)
    assert strategy.sample_weighted is False
    assert strategy.staleness == "polynomial"
    assert task.spec.learning_rate == 0.003
    assert task.spec.model == "cnn-small"


def test_updates_are_weighted_by_site_size_unless_uniform_weights_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = _task("--strategy", "fedbuff", monkeypatch=monkeypatch)
    assert task.strategy.sample_weighted is True
