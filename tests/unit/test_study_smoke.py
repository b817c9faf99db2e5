"""The learning study on a tiny generated dataset and budget: output shape and time semantics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.study import cli
from benchmarks.study.data import Partition, StudyData
from benchmarks.study.federated import FederatedRun
from benchmarks.study.spec import LocalRecipe, RunSpec, StudySettings
from benchmarks.study.studies import fedasync, fedavg
from benchmarks.study.timing import TimeModel
from tests.datagen import write_medmnist_npz

SECONDS_PER_SAMPLE = 0.01
SITES = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_medmnist_npz(directory / "pneumoniamnist.npz", sizes=(400, 40, 80))
    return directory


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _straggler_run(data_dir: Path, tmp_path: Path, strategy: str) -> dict[str, object]:
    settings = StudySettings(
        model="cnn-small", budget_s=3.3, eval_every_s=1.0, sites=SITES,
        recipe=LocalRecipe(steps=1),
    )  # fmt: skip
    config = fedasync(0) if strategy == "fedasync" else fedavg(0, SITES)
    run = RunSpec(strategy, config, partition=Partition("iid"), stragglers=2)
    # Transfers take no time here, so durations are pure compute x slowdown.
    timing = TimeModel(seconds_per_sample=SECONDS_PER_SAMPLE, model_bytes=0)
    return FederatedRun(run, settings, StudyData.load(data_dir), timing, tmp_path).execute()


def test_a_straggler_five_times_slower_delivers_five_times_fewer_async_updates(
    data_dir: Path, tmp_path: Path
) -> None:
    # Given 4 IID sites of 100 examples, one batch of 32 per round, the last 2 sites 5x slower
    stats = _straggler_run(data_dir, tmp_path, "fedasync")
    sites = stats["sites"]
    assert isinstance(sites, list)
    fast, slow = sites[0], sites[-1]
    # Then a fast round takes 0.32 s and a slow one 1.6 s: 10 against 2 in 3.3 s
    assert fast["mean_update_seconds"] == pytest.approx(32 * SECONDS_PER_SAMPLE)
    assert slow["mean_update_seconds"] == pytest.approx(5 * 32 * SECONDS_PER_SAMPLE)
    assert (fast["updates_delivered"], slow["updates_delivered"]) == (10, 2)
    assert stats["updates_applied"] == 2 * 10 + 2 * 2


def test_a_fedavg_round_lasts_as_long_as_its_slowest_site(data_dir: Path, tmp_path: Path) -> None:
    stats = _straggler_run(data_dir, tmp_path, "fedavg")
    intervals = stats["version_intervals_s"]
    assert isinstance(intervals, list)
    # 1.6 s per round: two rounds fit in 3.3 s, every site delivers once per round
    assert intervals == pytest.approx([1.6, 1.6])
    assert stats["updates_applied"] == 2 * SITES
    assert stats["mean_staleness"] == 0.0


def test_the_study_command_writes_results_summary_and_figure(
    data_dir: Path, tmp_path: Path
) -> None:
    # When a tiny strategies study runs through the command line
    code = cli.main([
        "strategies", "--data-dir", str(data_dir), "--budget", "1.2", "--eval-every", "0.4",
        "--sites", str(SITES), "--local-steps", "1", "--seconds-per-sample",
        str(SECONDS_PER_SAMPLE), "--only", "centralized,FedBuff K=4,FedAvg barrier",
        "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
        "--figures-dir", str(tmp_path / "figures"),
    ])  # fmt: skip
    assert code == 0
    # Then the full JSON holds every run with increasing virtual times inside the budget
    document = json.loads((tmp_path / "results" / "study-strategies-cnn-small.json").read_text())
    runs = {run["name"]: run for run in document["runs"]}
    assert set(runs) == {"centralized", "FedBuff K=4", "FedAvg barrier"}
    assert document["time_model"]["seconds_per_sample"] == SECONDS_PER_SAMPLE
    for run in runs.values():
        times = [point["t"] for point in run["points"]]
        # A batch that starts before the budget finishes (centralized: 0.32 s per batch)
        assert times == sorted(times) and times[0] == 0.0 and times[-1] < 1.2 + 0.32
        assert all(0.0 <= point["accuracy"] <= 1.0 for point in run["points"])
        assert [t["target"] for t in run["summary"]["targets"]] == [0.8, 0.85]
    # The centralized clock is its optimizer steps: batches start at 0, 0.32, 0.64, 0.96 s
    assert runs["centralized"]["statistics"]["steps"] == 4
    fedbuff = runs["FedBuff K=4"]["statistics"]
    assert fedbuff["updates_applied"] == 4 * fedbuff["versions"]
    assert len(fedbuff["sites"]) == SITES
    # And the small summary and the figure sit next to each other
    summary = json.loads((tmp_path / "figures" / "study-strategies-cnn-small.json").read_text())
    assert [run["name"] for run in summary["runs"]] == list(runs)
    assert (tmp_path / "figures" / "study-strategies-cnn-small.png").stat().st_size > 10_000
