"""Run one study: measure this machine's speed, run every RunSpec, collect the numbers."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.study.centralized import run_centralized_baseline
from benchmarks.study.data import Partition, StudyData
from benchmarks.study.federated import FederatedRun
from benchmarks.study.spec import RunSpec, StudySettings, task_definition
from benchmarks.study.studies import TARGETS, fedbuff
from benchmarks.study.timing import TimeModel, measure_seconds_per_sample
from services.aggregator.bootstrap import initial_layout_and_weights
from services.report.logs import EvalPoint, load_run
from services.report.summary import summarize

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class RunOutcome:
    """One run's spec, summary (best, final, time to targets), statistics and eval points."""

    spec: RunSpec
    run_dir: Path
    summary: dict[str, Any]
    statistics: dict[str, Any]
    points: list[dict[str, Any]]
    real_seconds: float
    budget_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            **self.spec.describe(),
            "run_dir": str(self.run_dir),
            "summary": self.summary,
            "statistics": self.statistics,
            "points": self.points,
            "real_seconds": round(self.real_seconds, 1),
            "budget_s": self.budget_s,
        }


def time_model(
    settings: StudySettings, data: StudyData, *, seconds_per_sample: float | None
) -> TimeModel:
    """This machine's measured training speed (unless pinned) and the model's transfer size."""
    probe = RunSpec("probe", fedbuff(settings.seed))
    task = task_definition(probe, settings, task_id="probe")
    layout, _, _ = initial_layout_and_weights(task)
    if seconds_per_sample is None:
        largest = max(data.sites(Partition(seed=settings.seed), settings.sites), key=len)
        seconds_per_sample = measure_seconds_per_sample(task.spec, largest)
    return TimeModel(
        seconds_per_sample=seconds_per_sample,
        model_bytes=layout.size * FLOAT32_BYTES,
        bandwidth_mbit_s=settings.bandwidth_mbit_s,
    )


def run_one(
    spec: RunSpec, settings: StudySettings, data: StudyData, timing: TimeModel, root: Path
) -> RunOutcome:
    """Execute one run into `root/<slug>` and read its eval log back as the report does."""
    run_dir = root / slug(spec.name)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    if spec.centralized:
        statistics = run_centralized_baseline(spec, settings, data, timing, run_dir)
    else:
        statistics = FederatedRun(spec, settings, data, timing, run_dir).execute()
    real_seconds = time.perf_counter() - started
    run = load_run(run_dir)
    summary = asdict(summarize(run, TARGETS))
    budget = settings.budget_s * (spec.budget_factor if spec.centralized else 1.0)
    points = [_point(p) for p in run.points]
    return RunOutcome(spec, run_dir, summary, statistics, points, real_seconds, budget)


def slug(name: str) -> str:
    """A directory name for a run name: `FedBuff K=4, IID` -> `fedbuff-k-4-iid`."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "run"


def _point(point: EvalPoint) -> dict[str, Any]:
    return {
        "t": round(point.seconds, 3),
        "version": point.version,
        "updates": point.updates,
        "accuracy": point.accuracy,
        "auc": point.auc,
        "loss": point.loss,
    }
