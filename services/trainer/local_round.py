"""One local round: train the local model from its base on the site's data, then build the update.

Runs on a worker thread (the bus's own I/O thread keeps AMQP heartbeats flowing, the
main thread stays free for signals). Stopping is checked before every batch.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from types import TracebackType
from typing import Any

import torch
from torch import nn

from schemas import ModelUpdate, TaskSpec, new_id
from services.common.training import LabelledImages, TrainConfig, TrainResult, train_local
from services.trainer.local_model import LocalModel

ROUND_SEED_STRIDE = 1_000_003
"""Round `r` of a trainer seeded `s` shuffles with seed `s * stride + r`: distinct, reproducible."""


def train_config(spec: TaskSpec, *, seed: int) -> TrainConfig:
    """The local training recipe the task spec prescribes."""
    return TrainConfig(
        epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        lr=spec.learning_rate,
        optimizer=spec.optimizer,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        seed=seed,
        logit_adjustment=spec.logit_adjustment,
    )


def round_seed(seed: int, round_index: int) -> int:
    """Seed of one local round: each round sees a new data order, the same one on every run."""
    return seed * ROUND_SEED_STRIDE + round_index


class StepLimit:
    """`should_stop` for `train_local` that also ends the round after `max_steps` batches.

    `train_local` has no step limit of its own, and `should_stop` is also polled during
    simulated slowdown pauses, so batches are counted with a forward pre-hook instead.
    Once the limit is reached the last batch's pause is cut short; `finish_pause` makes
    it up after the round, so a simulated straggler stays as slow as it should.
    """

    def __init__(
        self, model: nn.Module, max_steps: int | None, stop: threading.Event, *, slowdown: float
    ) -> None:
        self._model = model
        self._max_steps = max_steps
        self._stop = stop
        self._slowdown = slowdown
        self.steps = 0
        self._batch_started = 0.0
        self._last_batch_s = 0.0
        self._hook: Any = None

    def __enter__(self) -> StepLimit:
        if self._max_steps is not None:
            self._hook = self._model.register_forward_pre_hook(self._count)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __call__(self) -> bool:
        """True once a stop was requested or the step budget is spent."""
        if self._stop.is_set():
            return True
        if self._max_steps is None or self.steps < self._max_steps:
            return False
        if self._batch_started:
            self._last_batch_s = time.perf_counter() - self._batch_started
            self._batch_started = 0.0
        return True

    def finish_pause(self) -> None:
        """Sleep the simulated pause of a step-limited round's last batch (stoppable)."""
        if self._slowdown > 1.0 and self._last_batch_s > 0.0:
            self._stop.wait((self._slowdown - 1.0) * self._last_batch_s)
            self._last_batch_s = 0.0

    def _count(self, _module: nn.Module, _inputs: Any) -> None:
        self.steps += 1
        if self.steps == self._max_steps:
            self._batch_started = time.perf_counter()


def run_local_round(
    local: LocalModel,
    dataset: LabelledImages,
    *,
    seed: int,
    stop: threading.Event,
    slowdown: float = 1.0,
) -> TrainResult:
    """Train `local.model` in place for one round; see `TrainResult.stopped_early`."""
    spec = local.spec
    with StepLimit(local.model, spec.local_steps, stop, slowdown=slowdown) as should_stop:
        result = train_local(
            local.model,
            dataset,
            train_config(spec, seed=seed),
            should_stop=should_stop,
            slowdown=slowdown,
        )
        paused_from = time.perf_counter()
        should_stop.finish_pause()
    local.mark_trained()
    # The round lasted until the made-up pause ended: `train_seconds` says so.
    return dataclasses.replace(result, seconds=result.seconds + time.perf_counter() - paused_from)


def build_update(
    local: LocalModel, result: TrainResult, *, trainer_id: str, update_id: str | None = None
) -> ModelUpdate:
    """The `ModelUpdate` of a finished round (delta cast to the task's transport precision)."""
    spec = local.spec
    if local.base_version is None:
        raise RuntimeError("no global model loaded yet")
    metrics = {"train_seconds": result.seconds, "train_steps": float(result.steps)}
    if result.mean_loss == result.mean_loss:  # NaN when no batch ran: leave it out
        metrics["train_loss"] = result.mean_loss
    return ModelUpdate(
        update_id=update_id or new_id(),
        task_id=spec.task_id,
        trainer_id=trainer_id,
        base_version=local.base_version,
        num_examples=result.num_examples,
        delta=local.delta(precision=spec.precision, max_norm=spec.max_update_norm),
        metrics=metrics,
    )


def set_torch_threads(count: int) -> None:
    """Intra-op threads for this process (a trainer shares its machine with others)."""
    torch.set_num_threads(count)
