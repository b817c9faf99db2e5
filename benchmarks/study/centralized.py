"""The centralized baseline in virtual time: `fedmq centralized`'s own loop, a virtual clock."""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType
from typing import Any

from benchmarks.study.data import DATA_SOURCE, StudyData
from benchmarks.study.spec import RunSpec, StudySettings
from benchmarks.study.timing import TimeModel
from services.centralized.trainer import CentralizedConfig, run_centralized
from services.common.optimizers import register_step_hook
from services.common.training import TrainConfig


class OptimizerStepClock:
    """Virtual seconds = optimizer steps taken x seconds of one batch on one site's machine.

    Counts through the local optimizers' global step hook, so it must be the only training
    in the process while it is entered (the study runs one run at a time).
    """

    def __init__(self, seconds_per_step: float) -> None:
        self.seconds_per_step = seconds_per_step
        self.steps = 0
        self._handle: Any = None

    def __enter__(self) -> OptimizerStepClock:
        self._handle = register_step_hook(self._count)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.remove()

    def __call__(self) -> float:
        return self.steps * self.seconds_per_step

    def _count(self, *_: Any) -> None:
        self.steps += 1


def run_centralized_baseline(
    run: RunSpec, settings: StudySettings, data: StudyData, timing: TimeModel, run_dir: Path
) -> dict[str, Any]:
    """Pooled train split, one machine of a site's speed, the sites' optimizer settings."""
    recipe = settings.recipe
    budget = settings.budget_s * run.budget_factor
    seconds_per_step = timing.compute_seconds(recipe.batch_size)
    epoch_s = math.ceil(len(data.train) / recipe.batch_size) * seconds_per_step
    train = TrainConfig(
        epochs=math.ceil(budget / epoch_s) + 1, batch_size=recipe.batch_size,
        lr=recipe.learning_rate, optimizer=recipe.optimizer, momentum=recipe.momentum,
        seed=settings.seed, logit_adjustment=recipe.logit_adjustment,
    )  # fmt: skip
    config = CentralizedConfig(
        run_dir=run_dir, name=run.name, model=settings.model, data_source=DATA_SOURCE,
        data_dir=data.data_dir, train=train, budget_seconds=budget,
        eval_every_seconds=settings.eval_every_s * run.budget_factor, overwrite=True,
    )  # fmt: skip
    with OptimizerStepClock(seconds_per_step) as clock:
        result = run_centralized(config, clock=clock)
    return {"steps": result.steps, "epochs": result.steps * recipe.batch_size / len(data.train)}
