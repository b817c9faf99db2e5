"""Aggregator settings (`FEDMQ_*` environment variables, CLI flags on top)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.aggregator.accounting import DEFAULT_DELTA
from services.aggregator.identity import DEFAULT_REPLAY_WINDOW_S
from services.aggregator.prefetch import DEFAULT_PREFETCH_BYTES
from services.aggregator.registry import DEFAULT_TRAINER_TIMEOUT_S
from services.common.settings import ServiceSettings


class AggregatorSettings(ServiceSettings):
    """Where the task and checkpoints live and how often state is made durable."""

    task_file: Path | None = None
    """YAML/JSON task definition; without one, flags (or their defaults) define the task."""
    checkpoint_dir: Path = Path("runs/checkpoints")
    """Directory of the checkpoints, one sub-directory per task (resumed on restart)."""
    checkpoint_every: int = Field(default=1, ge=1)
    """Write a checkpoint (and publish the model) at least every this many versions."""
    checkpoint_interval: float = Field(default=2.0, gt=0.0)
    """Also checkpoint when this many seconds passed with versions not yet durable."""
    commit_idle_grace: float = Field(default=0.0, ge=0.0)
    """Also checkpoint when no message arrived for this many seconds (0: as soon as the inbox is
    empty, lowest latency; under a steady stream 0.05 lets one commit cover many versions)."""
    prefetch: int | None = Field(default=None, ge=1)
    """Unacked updates held at once (None: as many as fit in `prefetch_bytes`, at most 128);
    raised to twice the strategy's buffer when smaller."""
    prefetch_bytes: int = Field(default=DEFAULT_PREFETCH_BYTES, gt=0)
    """Byte budget of the unacked updates when `prefetch` is not set."""
    max_message_bytes: int | None = Field(default=None, gt=0)
    """Cap on an update's body; None: derived from the model (its float64 size plus envelope,
    `schemas.DecodeLimits.for_model`). A value above the derived bound changes nothing."""
    trainer_timeout: float = Field(default=DEFAULT_TRAINER_TIMEOUT_S, gt=0.0)
    """A trainer silent (no heartbeat, no update) for this many seconds counts as gone."""
    aggregator_id: str = "aggregator"
    """This aggregator's name in events and logs."""
    trainer_keys: Path | None = None
    """Trainers' public keys (a file of `<id> ed25519:<base64>` lines or a dir of `*.pub`):
    when set, only these trainers are accepted and every update must be signed."""
    require_user_id_match: bool = False
    """Each trainer has its own broker login: `user_id` must be present and equal `trainer_id`."""
    replay_window_s: float = Field(default=DEFAULT_REPLAY_WINDOW_S, gt=0.0)
    """Updates created further than this from their arrival (either way) are replays."""
    dp_delta: float = Field(default=DEFAULT_DELTA, gt=0.0, lt=1.0)
    """delta of the (epsilon, delta) reported under central DP."""
    dp_epsilon_budget: float | None = Field(default=None, gt=0.0)
    """Under central DP, no version is published whose epsilon would exceed this."""
