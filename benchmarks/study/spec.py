"""What one run is (strategy, partition, stragglers, attackers) and the settings all runs share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from benchmarks.study.data import Partition
from schemas import TaskSpec
from services.aggregator.guard import GUARDS_OFF, GuardSettings
from services.aggregator.strategies.factory import StrategyConfig
from services.aggregator.task import TaskDefinition, with_consistent_spec

NUM_CLASSES = 2
IN_CHANNELS = 1
IMAGE_SIZE = 28
"""PneumoniaMNIST: binary, greyscale, 28 x 28."""

MANY_EPOCHS = 1000
"""`local_epochs` is an upper bound: `local_steps` ends every round, also on a tiny site."""


@dataclass(frozen=True)
class LocalRecipe:
    """Local training of every site in every federated run (and the centralized optimizer)."""

    steps: int = 16
    """Batches per local round: about one epoch of an average site (588 examples)."""
    batch_size: int = 32
    learning_rate: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    logit_adjustment: float = 0.0
    """tau of the logit-adjusted loss, in every site and in the centralized baseline."""


@dataclass(frozen=True)
class StudySettings:
    """Shared by every run of one study invocation."""

    model: str
    budget_s: float
    """Virtual wall-clock budget of every run, in seconds."""
    eval_every_s: float
    sites: int = 8
    seed: int = 0
    recipe: LocalRecipe = field(default_factory=LocalRecipe)
    bandwidth_mbit_s: float = 100.0
    slowdown: float = 5.0
    """How much slower a straggler computes."""


@dataclass(frozen=True)
class RunSpec:
    """One line of a study's plot."""

    name: str
    strategy: StrategyConfig | None
    """None: the centralized baseline."""
    partition: Partition = field(default_factory=Partition)
    stragglers: int = 0
    """The last `stragglers` sites compute `slowdown` times slower."""
    attackers: int = 0
    """The first `attackers` of the last sites (see `attacker_sites`) send manipulated deltas."""
    attack_scale: float = 1.0
    """Factor applied to an attacker's honest delta: -1 flips its sign, -10 also amplifies."""
    budget_factor: float = 1.0
    """Centralized only: a budget this many times the study's (e.g. the federation's compute)."""
    served_ema: float | None = None
    """Evaluate an exponential moving average of the versions (this decay per version)
    instead of the newest version: the served model, while trainers follow the versions."""
    guard: GuardSettings = field(default_factory=lambda: GUARDS_OFF)
    """The aggregator's guards: off, as when the studies here were first run."""

    @property
    def centralized(self) -> bool:
        return self.strategy is None

    def slowdown_of(self, site: int, settings: StudySettings) -> float:
        return settings.slowdown if site >= settings.sites - self.stragglers else 1.0

    def attack_of(self, site: int, settings: StudySettings) -> float | None:
        """The scale site `site` applies to its deltas, None for an honest site."""
        return self.attack_scale if site >= settings.sites - self.attackers else None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "centralized" if self.centralized else "federated",
            "strategy": None if self.strategy is None else self.strategy.model_dump(),
            "partition": self.partition.label,
            "stragglers": self.stragglers,
            "attackers": self.attackers,
            "attack_scale": self.attack_scale if self.attackers else None,
            "budget_factor": self.budget_factor,
            "served_ema": self.served_ema,
        }


def task_definition(run: RunSpec, settings: StudySettings, *, task_id: str) -> TaskDefinition:
    """The task an operator would start the aggregator with for this run."""
    if run.strategy is None:
        raise ValueError(f"{run.name} is centralized: it has no federated task")
    recipe = settings.recipe
    spec = TaskSpec(
        task_id=task_id, model=settings.model, num_classes=NUM_CLASSES, in_channels=IN_CHANNELS,
        image_size=IMAGE_SIZE, local_epochs=MANY_EPOCHS, local_steps=recipe.steps,
        batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
        optimizer=recipe.optimizer, momentum=recipe.momentum, seed=settings.seed,
        logit_adjustment=recipe.logit_adjustment,
    )  # fmt: skip
    task = TaskDefinition(spec=spec, strategy=run.strategy, guard=run.guard)
    return with_consistent_spec(task)
