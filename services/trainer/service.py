"""The trainer process: join, train locally, publish the delta, continue from the newest model.

One round: train on a worker thread from the newest global model held, publish
`local - base` with confirms (a refused update is retried with the same `update_id`,
never dropped), then pick up the newest model from the follower queue. After a lost
connection the trainer joins again and goes on with the model and version it had.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

import structlog

from schemas import GlobalModel, JoinAccepted, JoinRequest, ModelUpdate, TaskSpec, TrainerLeft
from services.common.bus import Bus, ConnectionLost, PublishRefused, TransportError, Unroutable
from services.common.connect import declare_follower
from services.common.data import DatasetError, ImageDataset
from services.common.messaging import publish_message
from services.common.models import UnknownModel
from services.common.signing import KeyFormatError, UpdateSigner, update_signer
from services.common.topology import (
    EVENTS_EXCHANGE,
    UPDATES_EXCHANGE,
    event_key,
    follower_queue_name,
    update_key,
)
from services.common.training import TrainResult
from services.trainer.backoff import Backoff
from services.trainer.follower import FOLLOW_POLL_INTERVAL_S, ModelFollower, newest_of
from services.trainer.heartbeat import HeartbeatSender, Status
from services.trainer.join import JoinFailed, JoinRefused, join_task
from services.trainer.local_model import DeltaNotFinite, LocalModel, ModelMismatch
from services.trainer.local_round import build_update, round_seed, run_local_round
from services.trainer.settings import TrainerSettings
from services.trainer.site_data import fit_to_spec, load_training_data

EXIT_OK = 0
EXIT_FAILED = 1
"""No aggregator answered in time, the data is missing, or the broker is gone for good."""
EXIT_REFUSED = 3
"""The aggregator refused the join (unknown task, unauthorised trainer)."""

T = TypeVar("T")
LeaveReason = Literal["shutdown", "error"]


class _Stopped(Exception):
    """Raised inside the loop when a stop was requested; the trainer then leaves cleanly."""


class SigningKeyMissing(Exception):
    """The task requires signed updates and this trainer has no signing key."""


@runtime_checkable
class _CountsConnections(Protocol):
    """A bus that reconnects by itself and counts its connections (`PikaBus`)."""

    @property
    def connects(self) -> int: ...


def broker_login(amqp_url: str) -> str | None:
    """The user name in the broker URL: sent as `user_id` so the broker vouches for the sender.

    None when the URL has none (certificate login), where the broker would refuse a guess.
    """
    username = urlsplit(amqp_url).username
    return unquote(username) if username else None


_FAILURES = (
    JoinFailed,
    DatasetError,
    ModelMismatch,
    UnknownModel,
    TransportError,
    SigningKeyMissing,
    KeyFormatError,
    OSError,
)
"""Errors that end the trainer with `EXIT_FAILED` and a log line instead of a traceback."""


class TrainerService:
    """One site's trainer. `run()` returns the process exit code; `stop()` ends it cleanly."""

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        bus: Bus,
        dataset: ImageDataset | None = None,
        stop_event: threading.Event | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._dataset = dataset
        self._stop = stop_event or threading.Event()
        self._backoff = backoff or Backoff()
        self._task = settings.task_id
        self._trainer = settings.trainer_id
        self._user_id = broker_login(settings.broker_urls[0])
        self._follower = ModelFollower(
            bus, follower_queue_name(self._task, self._trainer), task_id=self._task
        )
        self._status = Status()
        self._log = structlog.get_logger(__name__).bind(task=self._task, trainer=self._trainer)
        self._spec: TaskSpec | None = None
        self._num_examples = 0
        self._pending: GlobalModel | None = None
        self._heartbeat: HeartbeatSender | None = None
        self._connects_seen: int | None = None
        self._rounds = 0
        self._sign: UpdateSigner = update_signer(None)

    @property
    def updates_sent(self) -> int:
        """Updates the broker confirmed so far."""
        return self._status.updates_sent

    def stop(self) -> None:
        """Ask the trainer to stop after the current batch (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> int:
        """Join, train until stopped or `max_updates` is reached, leave; the exit code."""
        structlog.contextvars.bind_contextvars(task=self._task, trainer=self._trainer)
        code, detail = EXIT_OK, ""
        reason: LeaveReason = "shutdown"
        try:
            self._run()
        except _Stopped:
            self._log.info("stopping on request")
        except JoinRefused as error:
            self._log.error("the aggregator refused to let this trainer join", error=str(error))
            code, reason, detail = EXIT_REFUSED, "error", str(error)
        except _FAILURES as error:
            self._log.error("trainer failed", error=str(error), error_type=type(error).__name__)
            code, reason, detail = EXIT_FAILED, "error", f"{type(error).__name__}: {error}"
        except Exception as error:  # a bug: tell the aggregator why we go, then crash loudly
            reason, detail = "error", f"{type(error).__name__}: {error}"
            raise
        finally:
            self._leave(reason, detail)
        return code

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        self._sign = update_signer(self._settings.signing_key_file)
        if not declare_follower(
            self._bus,
            self._task,
            self._trainer,
            queue_type=self._settings.follower_queue_type,
            stop=self._stop,
        ):
            raise _Stopped
        dataset = self._dataset if self._dataset is not None else load_training_data(self._settings)
        if len(dataset) == 0:
            raise DatasetError(f"site {self._trainer!r} has no training examples")
        accepted = self._join(num_examples=len(dataset))
        local = self._start(accepted)
        data = fit_to_spec(dataset, local.spec, self._settings)
        self._log.info(
            "joined", version=local.base_version, examples=len(data), model=local.spec.model
        )
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmq-train") as worker:
            while not self._sent_enough():
                result = self._train_round(worker, local, data)
                update = self._make_update(local, result)
                if update is not None:
                    self._send(update)
                    if self._sent_enough():
                        break
                self._rejoin_if_reconnected()
                self._advance(local)
        self._log.info("sent the requested number of updates; leaving")

    def _sent_enough(self) -> bool:
        if self._stop.is_set():
            raise _Stopped
        limit = self._settings.max_updates
        return limit is not None and self._status.updates_sent >= limit

    def _train_round(
        self, worker: ThreadPoolExecutor, local: LocalModel, data: ImageDataset
    ) -> TrainResult:
        self._status.state = "training"
        seed = round_seed(self._settings.seed, self._rounds)
        self._rounds += 1
        result = worker.submit(
            run_local_round,
            local,
            data,
            seed=seed,
            stop=self._stop,
            slowdown=self._settings.simulated_slowdown,
        ).result()
        if self._stop.is_set():
            self._log.info("local round abandoned: stopping", steps=result.steps)
            raise _Stopped
        return result

    def _make_update(self, local: LocalModel, result: TrainResult) -> ModelUpdate | None:
        try:
            return self._sign(build_update(local, result, trainer_id=self._trainer))
        except DeltaNotFinite as error:
            self._log.error("local training diverged; update not sent", error=str(error))
            return None

    def _send(self, update: ModelUpdate) -> None:
        """Publish until confirmed; back-pressure and lost connections retry the same update."""
        log = self._log.bind(update_id=update.update_id, version=update.base_version)
        self._status.state = "sending"
        pause = dataclasses.replace(self._backoff)
        while True:
            try:
                self._publish_update(update)
            except (PublishRefused, Unroutable) as error:
                delay = pause.next_delay()
                log.warning(
                    "update refused (back-pressure); retrying it", error=str(error), in_s=delay
                )
                if self._stop.wait(delay):
                    log.warning("stopping: the refused update is abandoned")
                    raise _Stopped from error
                continue
            except ConnectionLost as error:
                log.warning("connection lost while sending; joining again", error=str(error))
                self._rejoin()
                continue
            self._status.updates_sent += 1
            log.info("update sent", examples=update.num_examples, **update.metrics)
            return

    def _publish_update(self, update: ModelUpdate) -> None:
        publish_message(
            self._bus,
            UPDATES_EXCHANGE,
            update_key(self._task, self._trainer),
            update,
            user_id=self._user_id,
            mandatory=True,
        )

    def _advance(self, local: LocalModel) -> None:
        """Continue from the newest model held; under a round barrier wait for a newer one."""
        model = self._next_model(local.base_version)
        if model is None:
            local.reset_to_base()
            return
        local.load_global(model)
        self._status.model_version = model.version
        self._log.info("continuing from a newer model", version=model.version)

    def _next_model(self, base: int | None) -> GlobalModel | None:
        synchronous = self._spec is not None and self._spec.synchronous
        while True:
            pending, self._pending = self._pending, None
            queued = self._resilient(lambda: self._follower.newest(newer_than=base))
            model = newest_of(pending, queued)
            if model is not None and (base is None or model.version > base):
                return model
            if not synchronous:
                return None
            self._status.state = "waiting"
            if self._stop.wait(FOLLOW_POLL_INTERVAL_S):
                raise _Stopped

    # -- joining ---------------------------------------------------------------------------

    def _join(self, *, num_examples: int) -> JoinAccepted:
        request = JoinRequest(
            task_id=self._task, trainer_id=self._trainer, num_examples=num_examples
        )
        self._num_examples = num_examples
        accepted = join_task(
            self._bus,
            request,
            timeout=self._settings.join_timeout,
            stop=self._stop,
            backoff=dataclasses.replace(self._backoff),
            user_id=self._user_id,
        )
        if accepted is None:
            raise _Stopped
        if isinstance(self._bus, _CountsConnections):
            self._connects_seen = self._bus.connects
        return accepted

    def _start(self, accepted: JoinAccepted) -> LocalModel:
        spec = accepted.spec
        self._spec = spec  # joined: from now on leaving is announced
        if spec.signatures_required and self._settings.signing_key_file is None:
            raise SigningKeyMissing("the task requires signed updates: pass --signing-key-file")
        local = LocalModel(spec)
        local.load_global(accepted.model)
        self._status.model_version = accepted.model.version
        self._heartbeat = HeartbeatSender(
            self._bus,
            task_id=self._task,
            sender_id=self._trainer,
            role="trainer",
            interval=spec.heartbeat_interval,
            status=self._status,
            user_id=self._user_id,
        )
        self._heartbeat.start()
        return local

    def _rejoin_if_reconnected(self) -> None:
        if self._reconnected():
            self._log.info("reconnected to the broker; joining again")
            self._rejoin()

    def _reconnected(self) -> bool:
        if not isinstance(self._bus, _CountsConnections) or self._connects_seen is None:
            return False
        return self._bus.connects > self._connects_seen

    def _rejoin(self) -> None:
        """Join again (idempotent for the aggregator) keeping our model; note a newer one."""
        accepted = self._join(num_examples=self._num_examples)
        if self._spec is not None and accepted.spec != self._spec:
            self._log.warning("the task spec changed; going on with the one first received")
        self._pending = newest_of(self._pending, accepted.model)
        self._log.info("joined again", version=accepted.model.version)

    def _resilient(self, action: Callable[[], T]) -> T:
        while True:
            try:
                return action()
            except ConnectionLost as error:
                self._log.warning("connection lost; joining again", error=str(error))
                self._rejoin()

    # -- leaving ---------------------------------------------------------------------------

    def _leave(self, reason: LeaveReason, detail: str) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._spec is None:
            return  # never joined: nobody to tell
        left = TrainerLeft(
            task_id=self._task,
            trainer_id=self._trainer,
            reason=reason,
            detail=detail[:4096],
            updates_sent=self._status.updates_sent,
        )
        try:
            publish_message(
                self._bus, EVENTS_EXCHANGE, event_key("trainer.left", self._task, self._trainer),
                left,
                user_id=self._user_id,
            )  # fmt: skip
        except TransportError as error:
            self._log.warning("could not announce leaving", error=str(error))
        self._log.info("left the task", reason=reason, updates_sent=self._status.updates_sent)
