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


def test_fedbuff_weighs_updates_alike_unless_sample_weighted_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _task("--strategy", "fedbuff", monkeypatch=monkeypatch).strategy.sample_weighted is False
    weighted = _task("--sample-weighted", monkeypatch=monkeypatch)
    assert weighted.strategy.sample_weighted is True


def test_without_flags_the_task_is_the_stable_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no flag at all, When the task is built
    task = _task(monkeypatch=monkeypatch)
    # Then it is FedBuff K=4, uniform, server lr 0.5, 16 local steps at lr 0.003
    strategy, spec = task.strategy, task.spec
    assert (strategy.name, strategy.buffer_size, strategy.server_lr) == ("fedbuff", 4, 0.5)
    assert strategy.sample_weighted is False
    assert (spec.local_steps, spec.learning_rate, spec.optimizer) == (16, 0.003, "sgd")
    assert spec.strategy == "fedbuff" and spec.synchronous is False


def test_other_strategies_keep_their_own_rules_and_local_epochs_mean_whole_epochs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given FedAvg with two whole local epochs
    task = _task("--strategy", "fedavg", "--local-epochs", "2", monkeypatch=monkeypatch)
    # Then FedAvg weighs by size with server lr 1, and rounds are epochs, not 16 steps
    assert (task.strategy.sample_weighted, task.strategy.server_lr) == (True, 1.0)
    assert (task.spec.local_epochs, task.spec.local_steps) == (2, None)


@pytest.mark.parametrize(
    "task_file", ["infra/tasks/pneumonia.yaml", "infra/k8s/base/task/pneumonia.yaml"]
)
def test_the_shipped_task_files_serve_the_stable_recipe(task_file: str) -> None:
    # Given a task file shipped for compose or Kubernetes
    from pathlib import Path

    from services.aggregator.recipe import STABLE_FEDBUFF, STABLE_SPEC
    from services.aggregator.task import load_task

    task = load_task(Path(__file__).resolve().parents[2] / task_file)
    # Then its local training and strategy are the recipe's, field by field
    spec, strategy = task.spec.model_dump(), task.strategy.model_dump()
    assert {key: spec[key] for key in STABLE_SPEC} == STABLE_SPEC
    assert {key: strategy[key] for key in STABLE_FEDBUFF} == STABLE_FEDBUFF


def test_without_flags_the_task_has_the_robust_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(monkeypatch=monkeypatch)
    strategy = task.strategy
    assert (strategy.name, strategy.aggregator, strategy.trim_fraction) == (
        "fedbuff", "trimmed_mean", 0.25,
    )  # fmt: skip
    assert task.guard.one_update_per_trainer and task.guard.clip_to_median
    assert task.guard.norm_bound_factor == 3.0


def test_fedasync_from_the_flags_defaults_to_the_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task("--strategy", "fedasync", monkeypatch=monkeypatch)
    assert task.strategy.aggregator == "mean"
