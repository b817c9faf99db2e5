"""The aggregator process: consumes updates and joins, applies the strategy, makes it durable.

One engine thread owns all state. Bus handlers only hand deliveries over through an inbox,
so the math never races and never blocks the connection thread. An update is acked only
once a checkpoint containing its effect is on disk (or once it was dead-lettered); the
committer thread does that writing, publishing and acking while the engine goes on.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import structlog
from pydantic import BaseModel

from schemas import (
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    DecodeError,
    GlobalModel,
    Heartbeat,
    JoinAccepted,
    JoinRequest,
    Message,
    ModelPublished,
    ModelUpdate,
    Rejection,
    TrainerJoined,
    TrainerLeft,
    encode,
)
from services.aggregator.admission import Admission, update_limits
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.committer import Commit, Committer
from services.aggregator.core import AggregatorCore, global_model_of
from services.aggregator.identity import SenderCheck, sender_check
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.poison import PoisonGuard
from services.aggregator.prefetch import update_bytes, update_prefetch
from services.aggregator.privacy_ledger import PrivacyLedger
from services.aggregator.registry import TrainerRegistry
from services.aggregator.settings import AggregatorSettings
from services.aggregator.strategies.base import StepResult
from services.aggregator.task import TaskDefinition
from services.aggregator.validation import RejectedStep, RejectedUpdate, RejectReason
from services.common.bus import (
    Bus,
    Delivery,
    TransportError,
    is_direct_reply_to,
    verified_sender,
)
from services.common.messaging import decode_delivery, publish_message
from services.common.topology import (
    EVENTS_EXCHANGE,
    MODELS_EXCHANGE,
    EventType,
    QueueSpec,
    Topology,
    control_queue,
    event_key,
    events_queue,
    model_key,
    task_topology,
    updates_queue,
)

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)

TICK_SECONDS = 0.25
"""How often the engine looks at clocks when no message arrives (round timeouts, expiry)."""
HEARTBEAT_INTERVAL_S = 5.0
_WAKE: tuple[str, None] = ("wake", None)
"""Put in the inbox when a commit finished, so that a due commit is not a tick late."""
MIN_WAIT_SECONDS = 0.001
"""Shortest wait for a delivery, so a pending idle commit never spins the engine."""
CONTROL_PREFETCH = 4
EVENTS_PREFETCH = 64
WATCHED_EVENTS: tuple[EventType, ...] = ("heartbeat", "trainer.left")
"""What the aggregator listens to on the events exchange (liveness of trainers)."""
PRIVACY_STEPS_KEY = "privacy.steps"
"""Where a buffered strategy's state keeps the DP release count."""
BAD_REPLY_TO_REASON = "bad-reply-to"
"""A join naming a reply address other than the broker's direct reply-to: never answered."""


@dataclass
class _Pending:
    """Deliveries whose effect is not durable yet, and when that last changed."""

    held: dict[str, Delivery] = field(default_factory=dict)
    """Admitted updates still in a strategy buffer, by update id (bodies dropped: an ack
    needs only the handle, and the strategy already holds the delta)."""
    to_ack: list[Delivery] = field(default_factory=list)
    """Deliveries to ack at the next commit."""


class AggregatorService:
    """Wires an `AggregatorCore` to the bus, the checkpoint store, metrics and events."""

    def __init__(
        self,
        *,
        bus: Bus,
        task: TaskDefinition,
        core: AggregatorCore,
        store: CheckpointStore,
        settings: AggregatorSettings,
        metrics: AggregatorMetrics | None = None,
        clock: Callable[[], float] = time.time,
        identity: SenderCheck | None = None,
    ) -> None:
        self._bus = bus
        self._task = task
        self._core = core
        self._store = store
        self._settings = settings
        self._metrics = metrics or AggregatorMetrics()
        self._clock = clock
        self._registry = TrainerRegistry(timeout=settings.trainer_timeout)
        self._identity = identity if identity is not None else _sender_check(settings, task)
        self._limits = update_limits(core.layout, max_message_bytes=settings.max_message_bytes)
        self._ledger = _privacy_ledger(core, store)
        self._admission = Admission(
            poison=PoisonGuard(store.directory),
            require_user_id_match=settings.require_user_id_match,
        )
        self._privacy_spent_logged = False
        self._inbox: queue.Queue[tuple[str, Delivery | None]] = queue.Queue()
        self._pending = _Pending()
        self._stop = threading.Event()
        self._durable_version = -1
        self._published: GlobalModel | None = None
        self._last_commit = clock()
        self._last_delivery = clock()
        self._last_heartbeat = 0.0
        self._log = log.bind(task=task.task_id)
        # A finished commit wakes the engine, which may be waiting for a delivery.
        self._committer = Committer(self._perform, on_done=lambda: self._inbox.put(_WAKE))

    @property
    def core(self) -> AggregatorCore:
        """The state machine (read it from the engine thread or after `run` returned)."""
        return self._core

    @property
    def prefetch(self) -> int:
        """Updates held unacked at once (services/aggregator/prefetch.py)."""
        return update_prefetch(
            explicit=self._settings.prefetch,
            budget_bytes=self._settings.prefetch_bytes,
            message_bytes=update_bytes(self._core.layout.size, self._task.spec.precision),
            buffer_size=self._core.strategy.buffer_size,
        )

    def stop(self) -> None:
        """Ask the engine to finish: it commits what it has and returns from `run`."""
        self._stop.set()

    def run(self) -> None:
        """Declare the topology, publish the current model, and serve until `stop()`."""
        self._declare()
        self._commit(force=True, wait=True)
        task_id = self._task.task_id
        self._bus.consume(updates_queue(task_id), self._enqueue("update"), prefetch=self.prefetch)
        self._bus.consume(control_queue(task_id), self._enqueue("join"), prefetch=CONTROL_PREFETCH)
        watch = self._watch_queue()
        self._bus.consume(watch.name, self._enqueue("event"), prefetch=EVENTS_PREFETCH)
        self._log.info("aggregator_serving", version=self._core.version, prefetch=self.prefetch)
        try:
            while not self._stop.is_set():
                self.step()
            self._commit(wait=True)
        finally:
            self._committer.close()
            self._admission.poison.close()
        self._log.info("aggregator_stopped", version=self._core.version)

    def step(self) -> None:
        """Handle at most one delivery, then the clocks, then commit when due."""
        try:
            source, delivery = self._inbox.get(timeout=self._wait_timeout())
        except queue.Empty:
            pass
        else:
            if delivery is not None:
                self._last_delivery = self._clock()
                self._dispatch(source, delivery)
        self._committer.check()
        self._metrics.on_tick()
        now = self._clock()
        self._on_clock(now)
        if self._commit_due(now, idle=self._inbox.empty()):
            self._commit()

    def _declare(self) -> None:
        task = self._task
        topology = task_topology(
            task.task_id, max_update_bytes=task.max_update_bytes, queue_type=task.queue_type
        )
        self._bus.declare(topology.merge(Topology(queues=(self._watch_queue(),))))

    def _watch_queue(self) -> QueueSpec:
        return events_queue(self._settings.aggregator_id, self._task.task_id, events=WATCHED_EVENTS)

    def _enqueue(self, source: str) -> Callable[[Delivery], None]:
        def hand_over(delivery: Delivery) -> None:
            self._inbox.put((source, delivery))

        return hand_over

    def _dispatch(self, source: str, delivery: Delivery) -> None:
        if source == "update":
            self._on_update(delivery)
        elif source == "join":
            self._on_join(delivery)
        else:
            self._on_event(delivery)

    # -- updates -----------------------------------------------------------------------

    def _on_update(self, delivery: Delivery) -> None:
        refusal = self._admission.refuse(delivery)
        if refusal is not None:
            self._core.count_rejection()
            self._dead_letter(delivery, refusal.reason, refusal.detail)
            return
        with self._admission.poison.handling(delivery):
            self._handle_update(delivery)

    def _handle_update(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        try:
            update = self._decode(delivery, ModelUpdate)
            self._check_sender(update, delivery)
            outcome = self._core.submit(
                update,
                redelivered=delivery.redelivered,
                now=self._clock(),
                declared_examples=self._declared_examples(update.trainer_id),
            )
        except DecodeError as error:
            self._core.count_rejection()
            self._dead_letter(delivery, error.reason.value, error.detail)
            return
        except RejectedStep as error:
            self._dead_letter(delivery, error.reason, error.detail, update=update)
            self._refuse_step(error)
            return
        except RejectedUpdate as error:
            self._dead_letter(delivery, error.reason, error.detail, update=update)
            return
        if outcome.status == "redelivered":
            self._log.info("redelivery_already_applied", update_id=update.update_id)
            self._pending.to_ack.append(delivery)
            return
        self._metrics.on_accepted(
            staleness=outcome.staleness, seconds=time.perf_counter() - started
        )
        if self._registry.accepted(update.trainer_id, now=self._clock()):
            self._announce_join(update.trainer_id, num_examples=update.num_examples)
        self._pending.held[update.update_id] = replace(delivery, body=b"")
        self._log.debug(
            "update_accepted",
            trainer=update.trainer_id,
            update_id=update.update_id,
            staleness=outcome.staleness,
            status=outcome.status,
        )
        if outcome.step is not None:
            self._settle(outcome.step)

    def _declared_examples(self, trainer_id: str) -> int | None:
        record = self._registry.get(trainer_id)
        return record.num_examples if record is not None and record.num_examples > 0 else None

    def _refuse_step(self, error: RejectedStep) -> None:
        """Dead-letter the buffered updates of a step the model guard refused."""
        self._log.error("step_refused", reason=error.reason, detail=error.detail)
        for update_id in error.update_ids:
            held = self._pending.held.pop(update_id, None)
            if held is not None:
                detail = f"update {update_id} was in a refused aggregate: {error.detail}"
                self._dead_letter(held, error.reason, detail)

    def _check_sender(self, update: ModelUpdate, delivery: Delivery) -> None:
        try:
            self._identity.check(
                update,
                user_id=delivery.properties.user_id,
                now=self._clock(),
                redelivered=delivery.redelivered,
            )
        except RejectedUpdate:
            self._core.count_rejection()
            raise

    def _settle(self, step: StepResult) -> None:
        for update_id in step.applied:
            delivery = self._pending.held.pop(update_id, None)
            if delivery is not None:
                self._pending.to_ack.append(delivery)
        self._log.debug("model_stepped", version=self._core.version, applied=len(step.applied))

    def _decode(self, delivery: Delivery, cls: type[M]) -> M:
        return decode_delivery(delivery, accept=(cls,), limits=self._limits)

    def _dead_letter(
        self, delivery: Delivery, reason: str, detail: str, *, update: ModelUpdate | None = None
    ) -> None:
        self._metrics.on_rejected(reason)
        sender = verified_sender(delivery)
        self._log.warning(
            "message_rejected",
            reason=reason,
            detail=detail,
            message_id=delivery.message_id,
            trainer=update.trainer_id if update else None,
            sender=sender,
        )
        # The sender named is the broker-checked login, never a claim of the body.
        detail = f"{detail} (sent by {sender!r})" if sender else f"{detail} (sender unverified)"
        try:
            self._bus.dead_letter(delivery, reason=reason, detail=detail)
        except TransportError as error:
            # The copy was refused (a full or missing dead-letter queue): drop the original
            # rather than let it come back and be refused again forever.
            self._log.error("dead_letter_failed", reason=reason, error=str(error))
            self._drop(delivery)
        rejection = Rejection(
            reason=reason,
            detail=detail[:4096],
            task_id=self._task.task_id,
            trainer_id=update.trainer_id if update else None,
            update_id=update.update_id if update else None,
            message_id=_safe_id(delivery.message_id),
        )
        self._emit("update.rejected", rejection)

    # -- joins and events ----------------------------------------------------------------

    def _drop(self, delivery: Delivery) -> None:
        try:
            self._bus.reject(delivery)
        except TransportError as error:
            self._log.error("reject_failed", error=str(error))

    def _on_join(self, delivery: Delivery) -> None:
        reply_to = delivery.properties.reply_to
        if reply_to and not is_direct_reply_to(reply_to):
            # Checked before anything else, so no reply of any kind reaches a named queue.
            detail = (
                f"reply_to {reply_to[:128]!r} is not the broker's direct reply-to "
                "(amq.rabbitmq.reply-to.*); replies never go to a named queue"
            )
            self._dead_letter(delivery, BAD_REPLY_TO_REASON, detail)
            return
        try:
            request = self._decode(delivery, JoinRequest)
        except DecodeError as error:
            # The caller waits on its reply-to: tell it why instead of letting it time out.
            self._refuse_join(delivery, error.reason.value, error.detail)
            return
        try:
            self._identity.check_claim(
                request.trainer_id, user_id=verified_sender(delivery), what=f"{request.role} join"
            )
        except RejectedUpdate as error:
            self._refuse_join(delivery, error.reason, error.detail, request=request)
            return
        if request.task_id != self._task.task_id or self._published is None:
            detail = f"no task {request.task_id!r} is served here"
            self._refuse_join(delivery, "unknown-task", detail, request=request)
            return
        if request.role == "trainer" and self._registry.join(
            request.trainer_id, num_examples=request.num_examples, now=self._clock()
        ):
            self._announce_join(request.trainer_id, num_examples=request.num_examples)
        self._reply(delivery, JoinAccepted(spec=self._task.spec, model=self._published))
        self._bus.ack(delivery)

    def _refuse_join(
        self, delivery: Delivery, reason: str, detail: str, *, request: JoinRequest | None = None
    ) -> None:
        """Answer a join with a `Rejection` on its reply-to, then dead-letter the request."""
        rejection = Rejection(
            reason=reason,
            detail=detail[:4096],
            task_id=request.task_id if request else None,
            trainer_id=request.trainer_id if request else None,
            message_id=_safe_id(delivery.message_id),
        )
        self._reply(delivery, rejection)
        self._dead_letter(delivery, reason, detail)

    def _reply(self, request: Delivery, message: BaseModel) -> None:
        if not is_direct_reply_to(request.properties.reply_to):
            return
        try:
            self._bus.reply(
                request,
                encode(message),
                kind=str(message.model_dump(include={"kind"})["kind"]),
                headers={SCHEMA_HEADER: SCHEMA_VERSION},
            )
        except TransportError as error:
            self._log.warning("reply_failed", error=str(error))

    def _on_event(self, delivery: Delivery) -> None:
        # Events are acked with the next commit, in one batch: a synchronous ack per
        # heartbeat would cost the engine a round trip to the I/O thread, and handling a
        # redelivered heartbeat again is harmless.
        if delivery.kind not in ("heartbeat", "trainer_left"):
            self._pending.to_ack.append(delivery)
            return
        own = self._identity.service_login
        if self._settings.require_user_id_match and verified_sender(delivery) == own:
            self._pending.to_ack.append(delivery)  # our own timeout notice or heartbeat
            return
        try:
            event = decode_delivery(delivery, accept=(Heartbeat, TrainerLeft))
            self._check_event_sender(event, delivery)
        except DecodeError as error:
            self._dead_letter(delivery, error.reason.value, error.detail)
            return
        except RejectedUpdate as error:
            self._dead_letter(delivery, error.reason, error.detail)
            return
        now = self._clock()
        if isinstance(event, Heartbeat) and event.role == "trainer":
            if self._registry.seen(event.sender_id, now=now):
                self._announce_join(event.sender_id, num_examples=0)
        elif isinstance(event, TrainerLeft) and self._registry.leave(event.trainer_id):
            self._log.info("trainer_left", trainer=event.trainer_id, reason=event.reason)
            self._metrics.on_trainers(len(self._registry))
        self._pending.to_ack.append(delivery)

    def _check_event_sender(self, event: BaseModel, delivery: Delivery) -> None:
        """A site speaks only for itself: the key's sender, the body's and the login agree."""
        if isinstance(event, Heartbeat) and event.role == "trainer":
            claimed = event.sender_id
        elif isinstance(event, TrainerLeft):
            claimed = event.trainer_id
        else:
            return  # the aggregator's and evaluators' beats change nothing here
        keyed = delivery.routing_key.rsplit(".", 1)[-1]
        if keyed != claimed:
            raise RejectedUpdate(
                RejectReason.IDENTITY_MISMATCH,
                f"{delivery.kind} about {claimed!r} sent under routing key"
                f" {delivery.routing_key!r}",
            )
        what = str(delivery.kind)
        self._identity.check_claim(claimed, user_id=verified_sender(delivery), what=what)

    def _announce_join(self, trainer_id: str, *, num_examples: int) -> None:
        self._log.info("trainer_joined", trainer=trainer_id, num_examples=num_examples)
        self._metrics.on_trainers(len(self._registry))
        joined = TrainerJoined(
            task_id=self._task.task_id, trainer_id=trainer_id, num_examples=num_examples
        )
        self._emit("trainer.joined", joined)

    def _on_clock(self, now: float) -> None:
        try:
            step = self._core.poll(now=now)
        except RejectedStep as error:
            self._refuse_step(error)
            step = None
        if step is not None:
            self._settle(step)
        for trainer_id in self._registry.expire(now=now):
            self._log.warning("trainer_timed_out", trainer=trainer_id)
            self._metrics.on_trainers(len(self._registry))
            left = TrainerLeft(
                task_id=self._task.task_id, trainer_id=trainer_id, reason="heartbeat-timeout"
            )
            self._emit("trainer.left", left, who=trainer_id)
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            self._last_heartbeat = now
            beat = Heartbeat(
                task_id=self._task.task_id,
                sender_id=self._settings.aggregator_id,
                role="aggregator",
                model_version=self._core.version,
            )
            self._emit("heartbeat", beat, who=self._settings.aggregator_id)

    # -- durability ----------------------------------------------------------------------

    def _wait_timeout(self) -> float:
        """How long to wait for a delivery: until the idle grace of a due commit runs out."""
        grace = self._settings.commit_idle_grace
        if grace <= 0 or self._core.version == self._durable_version:
            return TICK_SECONDS
        left = self._last_delivery + grace - self._clock()
        return min(TICK_SECONDS, max(left, MIN_WAIT_SECONDS))

    def _commit_due(self, now: float, *, idle: bool) -> bool:
        if self._committer.busy:
            return False  # the next commit will cover everything applied meanwhile
        if self._pending.to_ack and self._core.version == self._durable_version:
            return True
        behind = self._core.version - self._durable_version
        if behind <= 0:
            return False
        # Idle = nothing waiting and nothing arrived for the grace period: under a steady
        # stream a commit then covers many versions instead of one per gap between messages.
        grace = self._settings.commit_idle_grace
        quiet = idle and (grace <= 0 or now - self._last_delivery >= grace)
        return (
            quiet
            or behind >= self._settings.checkpoint_every
            or now - self._last_commit >= self._settings.checkpoint_interval
        )

    def _commit(self, *, force: bool = False, wait: bool = False) -> None:
        """Snapshot new versions and the acks they cover; commit in the background or now."""
        core = self._core
        changed = force or core.version != self._durable_version
        commit = Commit(
            checkpoint=core.checkpoint() if changed else None,
            to_ack=self._pending.to_ack,
            active_trainers=len(self._registry),
            mean_staleness=core.mean_staleness,
            epsilon=core.epsilon,
        )
        self._pending.to_ack = []
        if changed:
            self._log_privacy_spent()
        if wait:
            self._committer.wait_idle()
            self._perform(commit)
        else:
            self._committer.submit(commit)
        self._last_commit = self._clock()

    def _perform(self, commit: Commit) -> None:
        """Checkpoint, publish the model, then ack what the checkpoint contains (in order)."""
        saved = commit.checkpoint
        if saved is not None:
            started = time.perf_counter()
            self._store.save(saved)
            if self._ledger is not None:
                steps = saved.strategy_state.get(PRIVACY_STEPS_KEY, 0)
                if isinstance(steps, int | float):
                    self._ledger.record(int(steps), epsilon=commit.epsilon)
            self._metrics.on_committed(version=saved.version, seconds=time.perf_counter() - started)
            model = global_model_of(self._task.task_id, self._core.layout, saved)
            self._durable_version = saved.version
            self._published = model
            self._publish_model(model, commit)
        if commit.to_ack:
            self._bus.ack_all(commit.to_ack)

    def _publish_model(self, model: GlobalModel, commit: Commit) -> None:
        try:
            publish_message(self._bus, MODELS_EXCHANGE, model_key(self._task.task_id), model)
        except TransportError as error:
            # Followers get the next version instead; the checkpoint already holds this one.
            self._log.warning("model_publish_failed", version=model.version, error=str(error))
            return
        saved = commit.checkpoint
        published = ModelPublished(
            task_id=self._task.task_id,
            version=model.version,
            updates_applied=saved.updates_applied if saved else self._core.updates_applied,
            updates_rejected=saved.updates_rejected if saved else self._core.updates_rejected,
            mean_staleness=commit.mean_staleness,
            active_trainers=commit.active_trainers,
            epsilon=commit.epsilon,
        )
        self._emit("model.published", published)

    def _log_privacy_spent(self) -> None:
        accountant = self._core.accountant
        if accountant is None or self._privacy_spent_logged or not accountant.exhausted:
            return
        self._privacy_spent_logged = True
        self._log.warning(
            "privacy_budget_exhausted",
            version=self._core.version,
            epsilon=accountant.epsilon,
            delta=accountant.delta,
            budget=accountant.budget,
            detail="no further version will be published; updates are dead-lettered",
        )

    def _emit(self, event: str, message: Message, *, who: str | None = None) -> None:
        try:
            key = event_key(event, self._task.task_id, who)  # type: ignore[arg-type]
            publish_message(
                self._bus, EVENTS_EXCHANGE, key, message, user_id=self._identity.service_login
            )
        except TransportError as error:
            self._log.warning("event_publish_failed", event=event, error=str(error))


def _privacy_ledger(core: AggregatorCore, store: CheckpointStore) -> PrivacyLedger | None:
    """With DP, the durable release count; the accountant resumes from it if it is ahead."""
    if core.accountant is None:
        return None
    ledger = PrivacyLedger(store.directory)
    core.accountant.noise.advance_to(ledger.steps)
    return ledger


def _sender_check(settings: AggregatorSettings, task: TaskDefinition) -> SenderCheck:
    return sender_check(
        trainer_keys=settings.trainer_keys,
        signatures_required=task.spec.signatures_required,
        require_user_id_match=settings.require_user_id_match,
        amqp_url=settings.broker_urls[0],
        replay_window_s=settings.replay_window_s,
    )


_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""What `Rejection.message_id` accepts (schemas.messages.MessageId)."""


def _safe_id(value: str | None) -> str | None:
    # ASCII only: `str.isalnum` also accepts "²" or "é", which `Rejection` refuses.
    if value is None or _SAFE_ID.fullmatch(value[:128]) is None:
        return None
    return value[:128]
