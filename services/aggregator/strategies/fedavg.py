"""FedAvg with a round barrier: the synchronous baseline to compare async strategies against.

The round is the current global version: only updates trained on it (staleness 0) count,
one per trainer. The round closes when `clients_per_round` updates arrived, or once
`round_timeout` seconds passed since it opened and at least `min_updates` arrived.
"""

from __future__ import annotations

import math
from typing import ClassVar

from services.aggregator.strategies.base import (
    Admission,
    FloatVector,
    Rejection,
    StateDict,
    StepResult,
    state_float,
)
from services.aggregator.strategies.fedbuff import DEFAULT_TRIM_FRACTION, BufferedStrategy
from services.aggregator.strategies.privacy import GaussianAggregateNoise
from services.aggregator.strategies.robust import AggregatorName
from services.aggregator.strategies.server_optimizers import ServerOptimizer
from services.aggregator.strategies.staleness import ConstantStaleness

DEFAULT_CLIENTS_PER_ROUND = 4
"""Updates that close a round at once."""

DEFAULT_MIN_UPDATES = 2
"""Updates a round needs before its timeout may close it."""

DEFAULT_ROUND_TIMEOUT_S = 600.0
"""Seconds after a round opened from which `min_updates` suffice to close it."""


class FedAvg(BufferedStrategy):
    """Round-barrier FedAvg; with the default plain server step (lr 1.0) it is classic FedAvg.

    `now` must come from a clock that survives restarts (wall time) if the state is
    checkpointed, since the round's opening time is part of it.
    """

    name: ClassVar[str] = "fedavg"

    def __init__(
        self,
        *,
        clients_per_round: int = DEFAULT_CLIENTS_PER_ROUND,
        min_updates: int = DEFAULT_MIN_UPDATES,
        round_timeout: float = DEFAULT_ROUND_TIMEOUT_S,
        sample_weighted: bool = True,
        aggregator: AggregatorName = "mean",
        trim_fraction: float = DEFAULT_TRIM_FRACTION,
        optimizer: ServerOptimizer | None = None,
        privacy: GaussianAggregateNoise | None = None,
        clip_norm: float | None = None,
    ) -> None:
        if not 1 <= min_updates <= clients_per_round:
            raise ValueError(
                f"need 1 <= min_updates ({min_updates}) <= clients_per_round ({clients_per_round})"
            )
        if round_timeout <= 0:
            raise ValueError(f"round_timeout must be > 0, got {round_timeout}")
        super().__init__(
            buffer_size=clients_per_round,
            staleness=ConstantStaleness(),
            sample_weighted=sample_weighted,
            aggregator=aggregator,
            trim_fraction=trim_fraction,
            optimizer=optimizer,
            privacy=privacy,
            clip_norm=clip_norm,
            max_staleness=None,
        )
        self.min_updates = min_updates
        self.round_timeout = round_timeout
        self._opened_at = math.nan  # nan: the current round has not been seen open yet

    @property
    def round_opened_at(self) -> float | None:
        """When the current round opened (`now` of the first call that saw it), or None."""
        return None if math.isnan(self._opened_at) else self._opened_at

    def admit(
        self, *, staleness: int, base_version: int, version: int, trainer_id: str | None = None
    ) -> Admission:
        """Reject updates from earlier rounds and a second update of a trainer in a round."""
        reason = super().admit(staleness=staleness, base_version=base_version, version=version)
        if reason is not None:
            return reason
        if staleness != 0 or any(c.base_version != base_version for c in self._buffer):
            return Rejection.OLD_ROUND
        if trainer_id is not None and any(c.trainer_id == trainer_id for c in self._buffer):
            return Rejection.DUPLICATE_IN_ROUND
        return None

    def poll(self, weights: FloatVector, *, now: float) -> StepResult | None:
        """Close the round if its timeout passed with at least `min_updates` updates."""
        self._on_arrival(now)
        return self._step(weights, now) if self._due(now) else None

    def state_dict(self) -> StateDict:
        """Buffered-strategy state plus the current round's opening time (nan if unseen)."""
        return {**super().state_dict(), "round_opened_at": self._opened_at}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore a checkpoint, including when the current round opened."""
        super().load_state_dict(state)
        self._opened_at = state_float(state, "round_opened_at")

    def _due(self, now: float) -> bool:
        arrived = len(self._buffer)
        if arrived >= self.buffer_size:
            return True
        timed_out = now - self._opened_at >= self.round_timeout  # False while nan
        return timed_out and arrived >= self.min_updates

    def _on_arrival(self, now: float) -> None:
        if math.isnan(self._opened_at):
            self._opened_at = now

    def _after_step(self, now: float) -> None:
        # The step bumps the global version: the next round opens right now.
        self._opened_at = now
