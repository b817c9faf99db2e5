"""The centralised baseline on a tiny generated MedMNIST file: logs `fedmq report` can read."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.centralized.cli import register
from services.centralized.trainer import (
    CentralizedConfig,
    CentralizedResult,
    RunDirectoryInUse,
    TrainingDiverged,
    run_centralized,
    task_id_for,
)
from services.common.training import TrainConfig
from services.report import load_run, read_eval_log, read_manifest
from tests.datagen import write_medmnist_npz

TRAIN, TEST = 192, 64
BATCH = 32
STEPS_PER_EPOCH = TRAIN // BATCH


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_medmnist_npz(directory / "pneumoniamnist.npz", sizes=(TRAIN, 16, TEST), seed=3)
    return directory


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeClock:
    """Unix time that advances one second per reading: budgets and timed evals, deterministic."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def config(data_dir: Path, run_dir: Path, **options: object) -> CentralizedConfig:
    defaults: dict[str, object] = {
        "run_dir": run_dir, "name": "central-test", "model": "cnn-small",
        "data_dir": data_dir, "train": TrainConfig(epochs=2, batch_size=BATCH, lr=0.01),
    }  # fmt: skip
    return CentralizedConfig(**(defaults | options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def two_epochs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CentralizedResult:
    """One shared two-epoch run (training is the slow part of these tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_centralized(config(data_dir, tmp_path_factory.mktemp("two-epochs")))
    finally:
        torch.set_num_threads(threads)


def test_per_epoch_run_writes_a_manifest_and_one_report_per_epoch_plus_the_initial_model(
    two_epochs: CentralizedResult,
) -> None:
    # Given
    result, run_dir = two_epochs, two_epochs.run_dir
    # Then
    manifest = read_manifest(run_dir)
    assert (manifest.name, manifest.kind, manifest.model, manifest.strategy) == (
        "central-test", "centralized", "cnn-small", None,
    )  # fmt: skip
    assert manifest.config["train_examples"] == TRAIN
    assert manifest.config["lr"] == 0.01
    reports = read_eval_log(run_dir / "eval.jsonl")
    assert reports == list(result.reports)
    assert [r.version for r in reports] == [0, 1, 2]
    assert [r.updates_applied for r in reports] == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert {(r.task_id, r.split, r.num_examples) for r in reports} == {
        ("central-test", "test", TEST)
    }
    assert all(manifest.started_at <= r.model_published_at <= r.evaluated_at for r in reports)  # type: ignore[operator]
    assert len(result.epoch_seconds) == 2
    assert not result.stopped_by_budget


def test_centralized_training_learns_the_generated_signal(two_epochs: CentralizedResult) -> None:
    # Then: the generated data is 70% one class; the model does better than guessing it
    final = two_epochs.reports[-1]
    assert final.accuracy > 0.8
    assert final.auc is not None and final.auc > 0.9
    assert final.loss < two_epochs.reports[0].loss


def test_the_run_directory_is_readable_by_the_report(two_epochs: CentralizedResult) -> None:
    # When
    run = load_run(two_epochs.run_dir)
    # Then
    assert run.name == "central-test"
    assert [p.updates for p in run.points] == [0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert run.points[0].seconds >= 0.0


def test_budget_stops_training_mid_epoch_and_the_final_model_is_still_evaluated(
    data_dir: Path, tmp_path: Path
) -> None:
    # Given: the fake clock advances 1 s per reading, so 12 s last a few batches
    run_config = config(data_dir, tmp_path / "run", budget_seconds=12.0)
    # When
    result = run_centralized(run_config, clock=FakeClock())
    # Then
    assert result.stopped_by_budget
    assert 0 < result.steps < STEPS_PER_EPOCH
    assert result.epoch_seconds == ()
    assert [r.updates_applied for r in result.reports] == [0, result.steps]


def test_timed_evaluations_happen_inside_epochs_with_increasing_updates(
    data_dir: Path, tmp_path: Path
) -> None:
    # Given
    run_config = config(
        data_dir, tmp_path / "run", eval_every_seconds=4.0,
        train=TrainConfig(epochs=1, batch_size=BATCH),
    )  # fmt: skip
    # When
    result = run_centralized(run_config, clock=FakeClock())
    # Then
    updates = [r.updates_applied for r in result.reports]
    assert len(updates) > 2  # initial, at least one timed evaluation, final
    assert updates[0] == 0
    assert updates[-1] == STEPS_PER_EPOCH
    assert all(a < b for a, b in itertools.pairwise(updates))
    assert [r.version for r in result.reports] == list(range(len(updates)))


def test_a_second_run_in_the_same_directory_is_refused_unless_overwriting(
    data_dir: Path, tmp_path: Path
) -> None:
    # Given: a run cut short by a budget on the fake clock
    run_config = config(data_dir, tmp_path / "run", budget_seconds=8.0)
    first = run_centralized(run_config, clock=FakeClock())
    # Then
    with pytest.raises(RunDirectoryInUse, match=r"eval\.jsonl exists"):
        run_centralized(run_config, clock=FakeClock())
    assert read_eval_log(tmp_path / "run" / "eval.jsonl") == list(first.reports)


def test_overwriting_replaces_the_previous_log(data_dir: Path, tmp_path: Path) -> None:
    # Given
    run_config = config(data_dir, tmp_path / "run", budget_seconds=8.0, overwrite=True)
    run_centralized(run_config, clock=FakeClock())
    # When
    result = run_centralized(run_config, clock=FakeClock())
    # Then
    lines = (tmp_path / "run" / "eval.jsonl").read_text().splitlines()
    assert len(lines) == len(result.reports) == 2
    assert json.loads(lines[-1])["updates_applied"] == result.steps


def test_a_diverging_run_stops_with_a_clear_error(data_dir: Path, tmp_path: Path) -> None:
    # Given: a learning rate no network survives
    diverging = TrainConfig(epochs=1, batch_size=BATCH, lr=1e9, momentum=0.0)
    run_config = config(data_dir, tmp_path / "run", train=diverging, budget_seconds=10.0)
    # Then
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        run_centralized(run_config, clock=FakeClock())


def test_task_id_is_made_valid_from_any_run_name() -> None:
    assert task_id_for("cnn small/lr=0.01") == "cnn-small-lr-0-01"
    assert task_id_for("") == "centralized"
    assert len(task_id_for("x" * 100)) == 64


def test_centralized_command_trains_writes_logs_and_prints_a_summary(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given
    parser = argparse.ArgumentParser(prog="fedmq")
    subcommands: Any = parser.add_subparsers(dest="command", required=True)
    register(subcommands)
    args = parser.parse_args(
        ["centralized", "--data-dir", str(data_dir), "--epochs", "1", "--lr", "0.01",
         "--run-dir", str(tmp_path / "cli-run"), "--torch-threads", "1"]
    )  # fmt: skip
    # When
    code = args.func(args)
    # Then
    out = capsys.readouterr().out
    assert code == 0
    assert "cli-run: 6 steps" in out
    assert "final acc" in out
    assert read_manifest(tmp_path / "cli-run").config["epochs"] == 1
    assert [r.updates_applied for r in read_eval_log(tmp_path / "cli-run" / "eval.jsonl")] == [
        0, STEPS_PER_EPOCH,
    ]  # fmt: skip


def test_the_final_model_is_saved_for_export_and_scores_as_the_last_evaluation(
    two_epochs: CentralizedResult, data_dir: Path
) -> None:
    # Given a finished two-epoch run
    from services.common.data import load_site_dataset
    from services.common.training import evaluate
    from services.export.source import find_source

    # When its run directory is opened as an export source
    source = find_source(two_epochs.run_dir)
    # Then it is the last evaluated model, which scores exactly as that evaluation said
    last = two_epochs.reports[-1]
    assert (source.kind, source.checkpoint.version) == ("centralized", last.version)
    assert source.checkpoint.updates_applied == two_epochs.steps
    assert source.data_source == "medmnist:pneumoniamnist"
    test = load_site_dataset("medmnist:pneumoniamnist", split="test", data_dir=data_dir)
    assert evaluate(source.model(), test).accuracy == last.accuracy
