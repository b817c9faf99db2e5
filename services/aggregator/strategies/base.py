"""The strategy interface: what the aggregator hands a strategy and what it gets back.

Strategies are pure: no I/O, no clocks of their own (`now` is passed in), and they never
mutate the weights they are given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

FloatVector = npt.NDArray[np.float32]
StateValue = npt.NDArray[Any] | int | float | str | list[int] | list[float] | list[str]
StateDict = dict[str, StateValue]
"""Checkpointable state: numpy arrays, ints, floats, strs and lists of them, flat keys."""

Admission = str | None
"""A machine-readable rejection reason, or None when the update is admitted."""


class Rejection(StrEnum):
    """Why a strategy refuses an update; the value travels in events and metrics labels."""

    STALE = "stale"
    FUTURE_VERSION = "future-version"
    OLD_ROUND = "old-round"
    DUPLICATE_IN_ROUND = "duplicate-in-round"


class InadmissibleContribution(ValueError):
    """`submit` was handed an update that `admit` would have refused."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, eq=False, slots=True)
class Contribution:
    """One trainer's update as the math sees it: a flat float32 delta and its provenance.

    `staleness` is `version_now - base_version` at admission. The delta must not be
    modified afterwards; strategies only read it.
    """

    update_id: str
    trainer_id: str
    delta: FloatVector
    num_examples: int
    staleness: int
    base_version: int

    def __post_init__(self) -> None:
        if self.delta.dtype != np.float32 or self.delta.ndim != 1:
            raise ValueError(
                f"delta must be a flat float32 vector, got {self.delta.dtype} "
                f"of shape {self.delta.shape}"
            )
        if self.num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {self.num_examples}")
        if self.staleness < 0 or self.base_version < 0:
            raise ValueError(
                f"staleness ({self.staleness}) and base_version ({self.base_version}) must be >= 0"
            )

    @property
    def version(self) -> int:
        """The global version when the update was admitted."""
        return self.base_version + self.staleness


@dataclass(frozen=True, eq=False, slots=True)
class StepResult:
    """A change of the global model: the new weights and which updates it contains."""

    weights: FloatVector
    applied: tuple[str, ...]
    info: Mapping[str, float] = field(default_factory=dict)


class Strategy(ABC):
    """Folds admitted contributions into the global weights.

    Subclasses share `clip_norm` (per-update L2 clipping) and `max_staleness` (admission).
    Buffered contributions are not part of `state_dict`: the aggregator acks an update only
    once its effect is checkpointed, so unapplied ones are redelivered after a crash.
    """

    name: ClassVar[str]

    def __init__(self, *, clip_norm: float | None = None, max_staleness: int | None = None) -> None:
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.clip_norm = clip_norm
        self.max_staleness = max_staleness
        self.steps = 0

    @property
    def buffer_size(self) -> int:
        """How many updates one step folds in (the aggregator's prefetch must be >= this)."""
        return 1

    def admit(
        self, *, staleness: int, base_version: int, version: int, trainer_id: str | None = None
    ) -> Admission:
        """Return a rejection reason, or None if an update with this provenance is welcome."""
        if base_version > version or staleness != version - base_version:
            return Rejection.FUTURE_VERSION
        if self.max_staleness is not None and staleness > self.max_staleness:
            return Rejection.STALE
        return None

    @abstractmethod
    def submit(
        self, weights: FloatVector, contribution: Contribution, *, now: float
    ) -> StepResult | None:
        """Take one admitted update; return the new weights if the global model changed.

        Raises `InadmissibleContribution` for an update `admit` would refuse.
        """

    def poll(self, weights: FloatVector, *, now: float) -> StepResult | None:
        """Take a time-driven step (e.g. a round timeout), if one is due."""
        return None

    def pending(self) -> tuple[str, ...]:
        """`update_id`s buffered but not yet applied, in arrival order."""
        return ()

    def state_dict(self) -> StateDict:
        """Checkpointable state (never the buffered contributions)."""
        return {"strategy": self.name, "steps": self.steps}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore what `state_dict` returned; checks it was taken from the same strategy."""
        if state.get("strategy") != self.name:
            raise ValueError(f"state is for strategy {state.get('strategy')!r}, not {self.name!r}")
        self.steps = state_int(state, "steps")

    def _check_admitted(self, contribution: Contribution) -> None:
        reason = self.admit(
            staleness=contribution.staleness,
            base_version=contribution.base_version,
            version=contribution.version,
            trainer_id=contribution.trainer_id,
        )
        if reason is not None:
            raise InadmissibleContribution(
                reason, f"update {contribution.update_id!r} from {contribution.trainer_id!r}"
            )


def check_delta(weights: FloatVector, contribution: Contribution) -> None:
    """Raise ValueError unless the delta fits the weights (a programming error upstream)."""
    if weights.dtype != np.float32 or weights.shape != contribution.delta.shape:
        raise ValueError(
            f"update {contribution.update_id!r}: delta shape {contribution.delta.shape} does not "
            f"match float32 weights of shape {weights.shape}"
        )


def state_int(state: StateDict, key: str) -> int:
    """`state[key]` as an int; ValueError if it is something else."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"state {key!r} must be an int, got {type(value).__name__}")
    return int(value)


def state_float(state: StateDict, key: str) -> float:
    """`state[key]` as a float; ValueError if it is not a number."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"state {key!r} must be a number, got {type(value).__name__}")
    return float(value)
