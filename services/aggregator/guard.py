"""Guards on the global model and on each update's size: pure checks, no I/O.

Robust aggregation limits what an update can do inside a buffer; these guards stop what
must never reach the model at all: weights that are not finite, that jump far from the
last model, or an update far longer than the ones honest sites have been sending.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from services.aggregator.strategies.base import FloatVector
from services.aggregator.strategies.robust import l2_norm

DEFAULT_MAX_ABS_WEIGHT = 1e4
"""No weight of a trained image model comes near this (cnn-small starts at most 1.0 and
stays below about 10): a larger one is an attack or an overflow on its way."""
DEFAULT_MAX_RELATIVE_CHANGE = 10.0
"""One update may move the model by at most 10x its L2 norm: honest cnn-small updates
move it by 0.05-0.4x (update norms 2-15 against a model norm of about 40); an update
that dwarfs the model replaces it rather than training it."""
MIN_REFERENCE_NORM = 1.0
"""The relative bound is taken of at least this norm, so that a model near zero (a fresh
linear layer, a toy model) can still take its first steps."""
DEFAULT_NORM_BOUND_FACTOR = 3.0
"""An update longer than 3x the median of the recent accepted ones is refused."""
DEFAULT_NORM_WINDOW = 32
"""Accepted update norms remembered for the median (4 versions of 8 sites at K=4)."""
DEFAULT_NORM_WARMUP = 8
"""Accepted updates needed before the median bound and the clipping apply."""


class GuardSettings(BaseModel):
    """How the aggregator guards the model (part of the task definition, all on by default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_abs_weight: PositiveFloat | None = DEFAULT_MAX_ABS_WEIGHT
    """Largest |weight| a new model may hold (None: only finiteness is checked)."""
    max_relative_change: PositiveFloat | None = DEFAULT_MAX_RELATIVE_CHANGE
    """Largest ||update|| / max(||model||, 1) of one update (None: unbounded)."""
    norm_bound_factor: PositiveFloat | None = DEFAULT_NORM_BOUND_FACTOR
    """Refuse an update longer than this times the median recent norm (None: off).
    Off by default under FedAsync (services/aggregator/task.py)."""
    clip_to_median: bool = True
    """Scale an update longer than the median recent norm down to it (norm clipping).
    Off by default under FedAsync, which is not a robust configuration in any case."""
    norm_window: PositiveInt = DEFAULT_NORM_WINDOW
    norm_warmup: PositiveInt = Field(default=DEFAULT_NORM_WARMUP)
    one_update_per_trainer: bool = True
    """A buffered strategy takes at most one update per site into each aggregate."""
    cap_num_examples: bool = True
    """An update's `num_examples` counts at most what its site declared when it joined."""


GUARDS_OFF = GuardSettings(
    max_abs_weight=None,
    max_relative_change=None,
    norm_bound_factor=None,
    clip_to_median=False,
    one_update_per_trainer=False,
    cap_num_examples=False,
)
"""Every guard off: the aggregator as it was before them (earlier studies' numbers)."""
FEDASYNC_DEFAULTS = {"norm_bound_factor": None, "clip_to_median": False}
"""FedAsync applies each update at once with its own step size alpha: the median bound
and clipping are left to the operator (and the model guard stays on)."""


@dataclass(frozen=True)
class ModelStats:
    """What the checks need of the current model, computed once per version."""

    norm: float
    max_abs: float

    @classmethod
    def of(cls, weights: FloatVector) -> ModelStats:
        """Norm and largest |weight| of `weights` (inf when a weight is not finite)."""
        largest = float(np.max(np.abs(weights))) if weights.size else 0.0
        return cls(norm=l2_norm(weights), max_abs=largest)


class ModelGuard:
    """Refuses model changes that leave finite, bounded territory; answers why, or None."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings

    def check_update(self, model: ModelStats, delta: FloatVector, delta_norm: float) -> str | None:
        """Whether the model with `delta` added in full would still pass (a cheap bound)."""
        largest = float(np.max(np.abs(delta))) if delta.size else 0.0
        limit = self.settings.max_abs_weight
        if limit is not None and model.max_abs + largest > limit:
            return (
                f"the update moves a weight by {largest:.4g}: the model could reach "
                f"{model.max_abs + largest:.4g}, above the bound {limit:.4g}"
            )
        return self._relative(delta_norm, model.norm, what="the update")

    def check_step(self, new: ModelStats) -> str | None:
        """Whether a new model computed by the strategy may replace the old one.

        Only finiteness and the largest weight: the relative bound is checked per update
        (`check_update`), because central DP's noise moves the model by far more than any
        one update on purpose.
        """
        if not math.isfinite(new.max_abs) or not math.isfinite(new.norm):
            return "the new model holds a value that is not finite"
        limit = self.settings.max_abs_weight
        if limit is not None and new.max_abs > limit:
            return f"the new model's largest weight {new.max_abs:.4g} exceeds {limit:.4g}"
        return None

    def _relative(self, change: float, norm: float, *, what: str) -> str | None:
        bound = self.settings.max_relative_change
        if not math.isfinite(change):
            return f"{what} has an infinite norm"
        reference = max(norm, MIN_REFERENCE_NORM)
        if bound is None or change <= bound * reference:
            return None
        return (
            f"{what} changes the model by {change:.4g}, {change / reference:.3g}x its norm"
            f" {norm:.4g} (bound {bound:g}x, of at least {MIN_REFERENCE_NORM:g})"
        )


class NormHistory:
    """Norms of recently accepted updates: the median bound and the clipping level."""

    def __init__(self, settings: GuardSettings, norms: Iterable[float] = ()) -> None:
        self.settings = settings
        self._norms: deque[float] = deque(
            (n for n in norms if math.isfinite(n)), maxlen=settings.norm_window
        )

    @property
    def norms(self) -> list[float]:
        """The remembered norms, oldest first (checkpointed)."""
        return list(self._norms)

    @property
    def median(self) -> float | None:
        """The median recent norm, or None during the warm-up."""
        if len(self._norms) < self.settings.norm_warmup:
            return None
        return statistics.median(self._norms)

    def refusal(self, norm: float) -> str | None:
        """Why an update of this norm is refused, or None."""
        median, factor = self.median, self.settings.norm_bound_factor
        if median is None or factor is None or median <= 0 or norm <= factor * median:
            return None
        return (
            f"L2 norm {norm:.4g} is {norm / median:.3g}x the median {median:.4g} of the last"
            f" {len(self._norms)} accepted updates (bound {factor:g}x)"
        )

    def clip_level(self) -> float | None:
        """The norm an accepted update is clipped to, or None when clipping is off."""
        median = self.median
        if not self.settings.clip_to_median or median is None or median <= 0:
            return None
        return median

    def record(self, norm: float) -> None:
        """Remember the norm of an accepted update (before clipping)."""
        if math.isfinite(norm):
            self._norms.append(norm)
