"""The aggregator's state machine: global weights, version, applied ids. No I/O.

The service feeds it decoded updates and the clock; it answers with what happened, and
the service does the publishing, checkpointing and acking.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from schemas import GlobalModel, ModelUpdate, Tensor
from services.aggregator.accounting import PrivacyAccountant
from services.aggregator.checkpoint import Checkpoint
from services.aggregator.guard import ModelGuard, ModelStats, NormHistory
from services.aggregator.layout import ParamLayout
from services.aggregator.strategies.base import Contribution, StateDict, StepResult, Strategy
from services.aggregator.strategies.robust import clip_l2, l2_norm
from services.aggregator.task import TaskDefinition
from services.aggregator.validation import (
    RejectedStep,
    RejectedUpdate,
    RejectReason,
    UpdateContext,
    is_already_applied,
    to_contribution,
)

MAX_APPLIED_IDS = 10_000
"""How many applied update ids are remembered (and checkpointed) to drop redeliveries.

A redelivery can only concern updates not yet acked, i.e. applied since the previous
checkpoint, so this bounds memory without weakening exactly-once application.
"""


GUARD_NORMS_KEY = "guard.norms"
"""Where the checkpoint keeps the recent accepted update norms (next to the strategy's state)."""

MIN_BATCHNORM_VARIANCE = 1e-5
"""BatchNorm running variances are kept at least this large (BatchNorm's own epsilon)."""


@dataclass(frozen=True)
class Outcome:
    """What one update did: buffered, stepped the model, or was a known redelivery."""

    status: Literal["buffered", "stepped", "redelivered"]
    staleness: int
    step: StepResult | None = None


class AggregatorCore:
    """Global weights + version + strategy; turns accepted updates into new versions."""

    def __init__(
        self,
        *,
        task: TaskDefinition,
        layout: ParamLayout,
        weights: npt.NDArray[np.float32],
        integers: dict[str, npt.NDArray[Any]],
        strategy: Strategy,
        version: int = 0,
        applied_ids: Iterable[str] = (),
        updates_applied: int = 0,
        updates_rejected: int = 0,
        accountant: PrivacyAccountant | None = None,
        recent_norms: Iterable[float] = (),
    ) -> None:
        self.task = task
        self.layout = layout
        self.weights = weights
        self.integers = integers
        self.strategy = strategy
        self.version = version
        self.updates_applied = updates_applied
        self.updates_rejected = updates_rejected
        self.accountant = accountant
        """Central DP's (epsilon, delta) and budget; None without DP (or without accounting)."""
        self._applied: OrderedDict[str, None] = OrderedDict.fromkeys(applied_ids)
        self._pending: dict[str, str] = {}
        """Buffered update ids and the trainer of each."""
        self._staleness_sum = 0.0
        self._staleness_count = 0
        float_entries = [e for e in layout.entries if e.is_float]
        self._delta_layout = ParamLayout(float_entries, bn_prefixes=layout.bn_prefixes)
        self._variances = [
            region for name, region in layout.slices.items() if name.endswith(".running_var")
        ]
        fedbn = task.spec.fedbn
        self._mask = layout.aggregation_mask(fedbn=True) if fedbn else None
        self._guard = ModelGuard(task.guard)
        self._norms = NormHistory(task.guard, recent_norms)
        self._stats = ModelStats.of(weights)
        self._good_state = _copied(strategy.state_dict())
        """The strategy's state after the last accepted step: restored when the guard
        refuses a step (a server optimizer's moments already took it in)."""

    @classmethod
    def restore(
        cls,
        *,
        task: TaskDefinition,
        layout: ParamLayout,
        strategy: Strategy,
        saved: Checkpoint,
        accountant: PrivacyAccountant | None = None,
    ) -> AggregatorCore:
        """Resume from a checkpoint (its fingerprint must match the task)."""
        if saved.fingerprint != task.fingerprint():
            raise ValueError(
                f"the checkpoint belongs to {saved.fingerprint!r}, not {task.fingerprint()!r}:"
                " use another checkpoint directory for another task or model"
            )
        state = dict(saved.strategy_state)
        norms = state.pop(GUARD_NORMS_KEY, None)
        strategy.load_state_dict(state)
        return cls(
            task=task,
            layout=layout,
            weights=saved.weights,
            integers=saved.integers,
            strategy=strategy,
            version=saved.version,
            applied_ids=saved.applied_ids,
            updates_applied=saved.updates_applied,
            updates_rejected=saved.updates_rejected,
            accountant=accountant,
            recent_norms=[float(n) for n in norms] if isinstance(norms, np.ndarray) else (),
        )

    @property
    def pending_ids(self) -> frozenset[str]:
        """Updates admitted into a strategy buffer but not yet part of the model."""
        return frozenset(self._pending)

    @property
    def mean_staleness(self) -> float:
        """Mean staleness of every update admitted since this process started."""
        return self._staleness_sum / self._staleness_count if self._staleness_count else 0.0

    @property
    def epsilon(self) -> float | None:
        """Central DP's epsilon spent by the versions so far; None when not accounted."""
        return None if self.accountant is None else self.accountant.epsilon

    @property
    def privacy_exhausted(self) -> bool:
        """Whether one more version would exceed the epsilon budget (nothing is applied)."""
        return self.accountant is not None and self.accountant.exhausted

    def context(self) -> UpdateContext:
        """The state an update is checked against right now."""
        return UpdateContext(
            task_id=self.task.task_id,
            version=self.version,
            delta_layout=self._delta_layout,
            strategy=self.strategy,
            applied_ids=self._applied,
            pending_ids=self._pending,
            max_update_norm=self.task.spec.max_update_norm,
            mask=self._mask,
        )

    def submit(
        self,
        update: ModelUpdate,
        *,
        redelivered: bool,
        now: float,
        declared_examples: int | None = None,
    ) -> Outcome:
        """Fold one update in; raises `RejectedUpdate` (counted) when it is not acceptable.

        `declared_examples` is what the trainer said it holds when it joined (None when it
        is not known): the update's own `num_examples` counts at most that much.
        `RejectedStep` means the step this update completed was refused as a whole.
        """
        context = self.context()
        if is_already_applied(update, context, redelivered=redelivered):
            return Outcome("redelivered", staleness=self.version - update.base_version)
        try:
            self._check_budget()
            contribution = to_contribution(update, context)
            self._check_one_per_trainer(contribution.trainer_id)
            contribution = self._guarded(contribution, declared_examples)
        except Exception:
            self.updates_rejected += 1
            raise
        self._pending[contribution.update_id] = contribution.trainer_id
        self._staleness_sum += contribution.staleness
        self._staleness_count += 1
        step = self.strategy.submit(self.weights, contribution, now=now)
        if step is None:
            return Outcome("buffered", staleness=contribution.staleness)
        self._apply(step)
        return Outcome("stepped", staleness=contribution.staleness, step=step)

    def poll(self, *, now: float) -> StepResult | None:
        """Give time-driven strategies (a round timeout) their chance to step.

        Raises `RejectedStep` when the model guard refuses the step.
        """
        step = self.strategy.poll(self.weights, now=now)
        if step is not None:
            self._apply(step)
        return step

    def count_rejection(self) -> None:
        """Count a message refused before it reached the core (undecodable, bad identity)."""
        self.updates_rejected += 1

    def global_model(self) -> GlobalModel:
        """The current weights as a `GlobalModel` message (float32, integers carried)."""
        return global_model_of(self.task.task_id, self.layout, self.checkpoint())

    def checkpoint(self) -> Checkpoint:
        """A snapshot to write to disk, safe to read from another thread.

        It shares the weights array (the core replaces it at every step, never mutates it)
        and copies the strategy's arrays (a server optimizer updates its moments in place).
        """
        state = _copied(self.strategy.state_dict())
        state[GUARD_NORMS_KEY] = np.array(self._norms.norms, dtype=np.float64)
        return Checkpoint(
            version=self.version,
            weights=self.weights,
            integers=dict(self.integers),
            strategy_state=state,
            applied_ids=list(self._applied),
            updates_applied=self.updates_applied,
            updates_rejected=self.updates_rejected,
            fingerprint=self.task.fingerprint(),
        )

    @property
    def recent_norms(self) -> list[float]:
        """Norms of the recently accepted updates (the median bound's memory)."""
        return self._norms.norms

    def _check_budget(self) -> None:
        accountant = self.accountant
        if accountant is not None and accountant.exhausted:
            raise RejectedUpdate(
                RejectReason.PRIVACY_BUDGET_EXHAUSTED,
                f"epsilon {accountant.epsilon:.4g} after {accountant.steps} versions: one more"
                f" would exceed the budget {accountant.budget} (delta {accountant.delta:g})",
            )

    def _check_one_per_trainer(self, trainer_id: str) -> None:
        # User-level DP assumes sensitivity C per trainer and step (see accounting.py);
        # without DP, one vote per site keeps a flooding site from filling the buffer.
        limited = self.accountant is not None or self.task.guard.one_update_per_trainer
        if limited and trainer_id in self._pending.values():
            raise RejectedUpdate(
                RejectReason.ALREADY_IN_BUFFER,
                f"trainer {trainer_id!r} already has an update in the next aggregate:"
                " each site counts at most once per aggregate",
            )

    def _guarded(self, contribution: Contribution, declared: int | None) -> Contribution:
        """The update norm bound, the model guard on this update alone, clipping, capping."""
        norm = l2_norm(contribution.delta)
        refusal = self._norms.refusal(norm)
        if refusal is not None:
            raise RejectedUpdate(RejectReason.NORM_OUTLIER, refusal)
        refusal = self._guard.check_update(self._stats, contribution.delta, norm)
        if refusal is not None:
            raise RejectedUpdate(RejectReason.MODEL_GUARD, refusal)
        changes: dict[str, object] = {}
        level = self._norms.clip_level()
        if level is not None and norm > level:
            changes["delta"] = clip_l2(contribution.delta, level)
        if self.task.guard.cap_num_examples and declared is not None and declared > 0:
            changes["num_examples"] = min(contribution.num_examples, declared)
        self._norms.record(norm)
        return replace(contribution, **changes) if changes else contribution  # type: ignore[arg-type]

    def _apply(self, step: StepResult) -> None:
        for region in self._variances:
            # Stale deltas of BatchNorm variances can overshoot below zero; a negative
            # variance makes every prediction NaN.
            np.maximum(step.weights[region], MIN_BATCHNORM_VARIANCE, out=step.weights[region])
        stats = ModelStats.of(step.weights)
        self._check_step(step, stats)
        self.weights = step.weights
        self._stats = stats
        self._good_state = _copied(self.strategy.state_dict())
        self.version += 1
        self.updates_applied += len(step.applied)
        for update_id in step.applied:
            self._pending.pop(update_id, None)
            self._applied[update_id] = None
        while len(self._applied) > MAX_APPLIED_IDS:
            self._applied.popitem(last=False)

    def _check_step(self, step: StepResult, stats: ModelStats) -> None:
        """Refuse a step whose model is not finite or holds a weight beyond the bound."""
        refusal = self._guard.check_step(stats)
        if refusal is None:
            return
        self.strategy.load_state_dict(_copied(self._good_state))
        for update_id in step.applied:
            self._pending.pop(update_id, None)
        self.updates_rejected += len(step.applied)
        raise RejectedStep(RejectReason.MODEL_GUARD, refusal, update_ids=step.applied)


def _copied(state: StateDict) -> StateDict:
    """A state dict whose arrays are copies (a server optimizer updates its own in place)."""
    return {
        key: value.copy() if isinstance(value, np.ndarray) else value
        for key, value in state.items()
    }


def global_model_of(task_id: str, layout: ParamLayout, saved: Checkpoint) -> GlobalModel:
    """The `GlobalModel` message of a checkpoint (float32 weights, integers carried)."""
    arrays = layout.unflatten(saved.weights, integers=saved.integers)
    tensors = tuple(Tensor.from_numpy(name, array) for name, array in arrays.items())
    return GlobalModel(
        task_id=task_id,
        version=saved.version,
        tensors=tensors,
        updates_applied=saved.updates_applied,
    )
