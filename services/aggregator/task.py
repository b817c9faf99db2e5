"""A task: what trainers are told (`TaskSpec`) plus how the aggregator folds their updates."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas import TaskSpec
from services.aggregator.guard import FEDASYNC_DEFAULTS, GuardSettings
from services.aggregator.strategies.factory import StrategyConfig
from services.aggregator.task_file import invalid_task, read_task_mapping
from services.common.topology import DEFAULT_MAX_UPDATE_BYTES


class TaskDefinition(BaseModel):
    """The operator's task file: the spec shown to trainers and the aggregation strategy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: TaskSpec
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    """Model and update-norm guards, one update per site per aggregate, capped sample counts."""
    queue_type: Literal["classic", "quorum"] = "classic"
    max_update_bytes: int = Field(default=DEFAULT_MAX_UPDATE_BYTES, gt=0)
    """Back-pressure: the updates queue refuses publishes beyond this many bytes."""

    @model_validator(mode="before")
    @classmethod
    def _guard_follows_strategy(cls, data: Any) -> Any:
        # A guard given as settings is explicit; given as a mapping or not at all, the
        # strategy decides the defaults of what it leaves out.
        if not isinstance(data, dict) or isinstance(data.get("guard"), GuardSettings):
            return data
        strategy = data.get("strategy")
        if isinstance(strategy, StrategyConfig):
            name = strategy.name
        else:
            name = strategy.get("name", "fedbuff") if isinstance(strategy, dict) else "fedbuff"
        if name != "fedasync":
            return data
        return {**data, "guard": {**FEDASYNC_DEFAULTS, **(data.get("guard") or {})}}

    @property
    def task_id(self) -> str:
        """The task's id, shared by every queue and routing key of the task."""
        return self.spec.task_id

    def fingerprint(self) -> str:
        """What must not change between a checkpoint and a restart (same model, same task)."""
        s = self.spec
        return f"{s.task_id}:{s.model}:{s.num_classes}:{s.in_channels}:{s.image_size}"


def load_task(path: Path) -> TaskDefinition:
    """Read a task file (YAML or JSON) into a validated `TaskDefinition`.

    Raises `MissingInput` or `TaskFileError` naming the file, the line and the field.
    """
    raw = read_task_mapping(path)
    try:
        return TaskDefinition.model_validate(raw)
    except ValidationError as error:
        raise invalid_task(path, error) from error


def with_consistent_spec(task: TaskDefinition) -> TaskDefinition:
    """Tell trainers what the strategy implies (the strategy's name, a round barrier or not)."""
    spec = task.spec.model_copy(
        update={
            "strategy": task.strategy.name,
            "synchronous": task.strategy.name == "fedavg",
        }
    )
    return task.model_copy(update={"spec": spec})
