"""What makes an update acceptable: the checks between a decoded `ModelUpdate` and the math."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from schemas import ModelUpdate
from services.aggregator.layout import LayoutMismatch, ParamLayout
from services.aggregator.strategies.base import Contribution, Strategy


class RejectReason(StrEnum):
    """Reasons the aggregator itself gives (strategies add stale/old-round/...)."""

    UNKNOWN_TASK = "unknown-task"
    DUPLICATE = "duplicate"
    SHAPE_MISMATCH = "shape-mismatch"
    NORM_TOO_LARGE = "norm-too-large"
    UNKNOWN_TRAINER = "unknown-trainer"
    IDENTITY_MISMATCH = "identity-mismatch"
    BAD_SIGNATURE = "bad-signature"
    REPLAY = "replay"
    PRIVACY_BUDGET_EXHAUSTED = "privacy-budget-exhausted"
    NON_FINITE = "non-finite"
    """A finite float64 value that overflows the model's float32 (1e300 becomes inf)."""
    ALREADY_IN_BUFFER = "already-in-buffer"
    """A trainer's second update while its first is still buffered (one vote per aggregate)."""
    NORM_OUTLIER = "norm-outlier"
    """An update far longer than the median of the recently accepted ones."""
    MODEL_GUARD = "model-guard"
    """The model would not be finite, or would move too far from the last one."""


class RejectedUpdate(Exception):
    """An update that must go to the dead-letter queue with `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RejectedStep(RejectedUpdate):
    """A whole aggregate refused by the model guard: every update in it is dead-lettered."""

    def __init__(self, reason: str, detail: str, *, update_ids: tuple[str, ...]) -> None:
        super().__init__(reason, detail)
        self.update_ids = update_ids


@dataclass(frozen=True)
class UpdateContext:
    """What the checks compare an update with: the aggregator's state at this moment."""

    task_id: str
    version: int
    delta_layout: ParamLayout
    strategy: Strategy
    applied_ids: Container[str]
    pending_ids: Container[str]
    max_update_norm: float | None
    mask: np.ndarray | None
    """Coordinates that are aggregated (FedBN masks BatchNorm out); None means all."""


def is_already_applied(update: ModelUpdate, context: UpdateContext, *, redelivered: bool) -> bool:
    """A broker redelivery of an update whose effect is already in the model: ack, skip."""
    return redelivered and update.update_id in context.applied_ids


def to_contribution(update: ModelUpdate, context: UpdateContext) -> Contribution:
    """Check an update against the task and the model; raise `RejectedUpdate` with a reason."""
    if update.task_id != context.task_id:
        raise RejectedUpdate(
            RejectReason.UNKNOWN_TASK,
            f"update for task {update.task_id!r} reached the aggregator of {context.task_id!r}",
        )
    if update.update_id in context.applied_ids or update.update_id in context.pending_ids:
        raise RejectedUpdate(
            RejectReason.DUPLICATE, f"update {update.update_id} was already received"
        )
    staleness = context.version - update.base_version
    refusal = context.strategy.admit(
        staleness=staleness,
        base_version=update.base_version,
        version=context.version,
        trainer_id=update.trainer_id,
    )
    if refusal is not None:
        raise RejectedUpdate(
            refusal,
            f"base version {update.base_version} against global version {context.version}"
            f" (staleness {staleness})",
        )
    delta = _flat_delta(update, context)
    return Contribution(
        update_id=update.update_id,
        trainer_id=update.trainer_id,
        delta=delta,
        num_examples=update.num_examples,
        staleness=staleness,
        base_version=update.base_version,
    )


def _flat_delta(update: ModelUpdate, context: UpdateContext) -> np.ndarray:
    arrays = {tensor.name: tensor.to_numpy() for tensor in update.delta}
    if len(arrays) != len(update.delta):
        raise RejectedUpdate(RejectReason.SHAPE_MISMATCH, "a tensor name appears twice")
    try:
        delta = context.delta_layout.flatten(arrays)
    except LayoutMismatch as mismatch:
        raise RejectedUpdate(RejectReason.SHAPE_MISMATCH, str(mismatch)) from None
    # The codec refuses NaN/Inf on the wire; only float64 can still overflow into float32.
    if any(t.dtype == "float64" for t in update.delta) and not np.isfinite(delta).all():
        raise RejectedUpdate(RejectReason.NON_FINITE, "a float64 value overflows float32")
    if context.mask is not None:
        delta *= context.mask
    if context.max_update_norm is not None:
        norm = float(np.linalg.norm(delta))
        if norm > context.max_update_norm:
            raise RejectedUpdate(
                RejectReason.NORM_TOO_LARGE,
                f"L2 norm {norm:.4g} exceeds the bound {context.max_update_norm:.4g}",
            )
    return delta
