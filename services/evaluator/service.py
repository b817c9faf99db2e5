"""The evaluator process: follow published models, evaluate the due ones, report and log them.

It joins like a trainer (`role="evaluator"`) to learn the task spec and the current model,
then polls its follower queue, which always holds just the newest model. Each report is
appended to the JSONL log (durably) before it is published on `fedmq.events`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

import structlog

from schemas import EvalReport, GlobalModel, JoinRequest, TaskSpec
from services.aggregator.best import SELECTION_SPLIT, BestStore, task_checkpoint_dir
from services.common.bus import Bus, ConnectionLost, TransportError
from services.common.connect import declare_follower
from services.common.data import DatasetError, ImageDataset, load_site_dataset
from services.common.messaging import publish_message
from services.common.models import UnknownModel, load_state_arrays, state_arrays
from services.common.topology import (
    EVENTS_EXCHANGE,
    event_key,
    follower_queue_name,
)
from services.common.training import EvalResult, evaluate
from services.evaluator.averaging import ServedAverage
from services.evaluator.eval_log import EvalLog
from services.evaluator.schedule import Decision, EvalSchedule
from services.evaluator.settings import EvaluatorSettings
from services.trainer.backoff import Backoff
from services.trainer.follower import FOLLOW_POLL_INTERVAL_S, ModelFollower, newest_of
from services.trainer.heartbeat import HeartbeatSender, Status
from services.trainer.join import JoinFailed, JoinRefused, join_task
from services.trainer.local_model import LocalModel, ModelMismatch
from services.trainer.service import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, broker_login


class _Stopped(Exception):
    """A stop was requested while joining."""


def build_report(
    model: GlobalModel, result: EvalResult, *, split: str, task_id: str
) -> EvalReport | None:
    """The `EvalReport` of one evaluation, or None when the loss is not finite (diverged).

    An undefined AUC (one class absent) travels as None; per-class accuracy only when
    every class is present in the split (NaN cannot travel, and a gap would shift classes).
    """
    if not math.isfinite(result.loss):
        return None
    per_class = result.per_class_accuracy
    return EvalReport.model_validate(
        {
            "task_id": task_id,
            "version": model.version,
            "split": split,
            "loss": result.loss,
            "accuracy": result.accuracy,
            "auc": None if math.isnan(result.auc) else result.auc,
            "per_class_accuracy": () if any(math.isnan(a) for a in per_class) else per_class,
            "num_examples": result.num_examples,
            "updates_applied": model.updates_applied,
            "model_published_at": model.published_at,
        }
    )


class EvaluatorService:
    """Evaluates due model versions until stopped; `run()` returns the exit code.

    Each due version is scored on `settings.split` (the selection split, `val`) and, on every
    `test_every`-th evaluation, on `settings.test_split`; both reports go to the log. Given
    `dataset` (tests), only the splits whose data was given are scored.
    """

    def __init__(
        self,
        settings: EvaluatorSettings,
        *,
        bus: Bus,
        dataset: ImageDataset | None = None,
        test_dataset: ImageDataset | None = None,
        stop_event: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        poll_interval: float = FOLLOW_POLL_INTERVAL_S,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._dataset = dataset
        self._test_dataset = test_dataset
        self._test_split = (
            None if settings.test_split in ("none", settings.split) else (settings.test_split)
        )
        self._evaluations = 0
        self._best: BestStore | None = None
        self._served = (
            ServedAverage(decay=settings.served_average) if settings.served_average > 0 else None
        )
        self._stop = stop_event or threading.Event()
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._poll_interval = poll_interval
        self._task = settings.task_id
        self._who = settings.evaluator_id
        self._log = structlog.get_logger(__name__).bind(task=self._task, evaluator=self._who)
        self._eval_log = EvalLog(settings.resolved_log_path, task_id=self._task)
        self._schedule = EvalSchedule(
            every_n_versions=settings.every_n_versions, min_interval=settings.min_interval
        )
        self._follower = ModelFollower(
            bus, follower_queue_name(self._task, self._who), task_id=self._task
        )
        self._status = Status(state="starting")
        self._heartbeat: HeartbeatSender | None = None
        self._pending: GlobalModel | None = None
        self.reports_written = 0
        self.last_report: EvalReport | None = None
        """The newest report on the selection split."""
        self.last_test_report: EvalReport | None = None

    def stop(self) -> None:
        """Stop after the evaluation in progress (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> int:
        """Join, then evaluate due versions until stopped; the process exit code."""
        structlog.contextvars.bind_contextvars(task=self._task, evaluator=self._who)
        try:
            self._run()
        except _Stopped:
            pass
        except JoinRefused as error:
            self._log.error("the aggregator refused the evaluator", error=str(error))
            return EXIT_REFUSED
        except (JoinFailed, DatasetError, ModelMismatch, UnknownModel, TransportError) as error:
            self._log.error("evaluator failed", error=str(error), error_type=type(error).__name__)
            return EXIT_FAILED
        finally:
            if self._heartbeat is not None:
                self._heartbeat.stop()
        self._log.info("evaluator stopped", reports=self.reports_written)
        return EXIT_OK

    def _run(self) -> None:
        if not declare_follower(
            self._bus,
            self._task,
            self._who,
            queue_type=self._settings.follower_queue_type,
            stop=self._stop,
        ):
            return
        self._schedule.last_version = self._eval_log.last_version()
        if self._schedule.last_version is not None:
            self._log.info("resuming after the logged versions", last=self._schedule.last_version)
        spec, current = self._join()
        local = LocalModel(spec)
        data = self._dataset if self._dataset is not None else self._load_data(spec)
        if self._test_split is not None and self._test_dataset is None and self._dataset is None:
            self._test_dataset = self._load_data(spec, split=self._test_split)
        if self._settings.checkpoint_dir is not None and self._settings.split == SELECTION_SPLIT:
            task_dir = task_checkpoint_dir(self._settings.checkpoint_dir, self._task)
            self._best = BestStore(task_dir, spec=spec)
        self._start_heartbeat(spec.heartbeat_interval)
        self._offer(local, data, current)
        while not self._stop.is_set():
            self._offer(local, data, self._poll())
            self._stop.wait(self._poll_interval)

    def _join(self) -> tuple[TaskSpec, GlobalModel]:
        request = JoinRequest(
            task_id=self._task, trainer_id=self._who, num_examples=0, role="evaluator"
        )
        accepted = join_task(
            self._bus,
            request,
            timeout=self._settings.join_timeout,
            stop=self._stop,
            backoff=dataclasses.replace(self._backoff),
            user_id=broker_login(self._settings.broker_urls[0]),
        )
        if accepted is None:
            raise _Stopped
        self._log.info("joined", version=accepted.model.version, model=accepted.spec.model)
        return accepted.spec, accepted.model

    def _load_data(self, spec: TaskSpec, *, split: str | None = None) -> ImageDataset:
        settings = self._settings
        return load_site_dataset(
            settings.data_source,
            split=split or settings.split,
            data_dir=settings.data_dir,
            channels=spec.in_channels,
            size=spec.image_size,
        )

    def _start_heartbeat(self, interval: float) -> None:
        self._heartbeat = HeartbeatSender(
            self._bus,
            task_id=self._task,
            sender_id=self._who,
            role="evaluator",
            user_id=broker_login(self._settings.broker_urls[0]),
            interval=interval,
            status=self._status,
        )
        self._heartbeat.start()

    def _poll(self) -> GlobalModel | None:
        """The newest model in the follower queue; waits out a lost broker up to a limit."""
        pause = dataclasses.replace(self._backoff)
        deadline = self._clock() + self._settings.join_timeout
        while True:
            try:
                return self._follower.newest(newer_than=self._schedule.last_version)
            except ConnectionLost as error:
                if self._clock() > deadline:
                    raise
                self._log.warning("broker unreachable; retrying", error=str(error))
                if self._stop.wait(pause.next_delay()):
                    return None

    # -- evaluating --------------------------------------------------------------------------

    def _offer(self, local: LocalModel, data: ImageDataset, model: GlobalModel | None) -> None:
        """Evaluate the newest of `model` and the one kept for later, if it is due."""
        candidate = newest_of(self._pending, model)
        self._pending = None
        self._status.state = "idle"
        if candidate is None:
            return
        decision = self._schedule.decide(candidate.version, now=self._clock())
        if decision is Decision.LATER:
            self._pending = candidate
        elif decision is Decision.DUE:
            self._evaluate(local, data, candidate)
        else:
            self._log.debug("version not evaluated", version=candidate.version, why=decision.value)

    def _evaluate(self, local: LocalModel, data: ImageDataset, model: GlobalModel) -> None:
        log = self._log.bind(version=model.version)
        self._status.state = "evaluating"
        self._status.model_version = model.version
        local.load_global(model)
        if self._served is not None:
            # The served model: the average of the versions so far (restarts from the first
            # version this process evaluates).
            arrays = self._served.observe(state_arrays(local.model), version=model.version)
            load_state_arrays(local.model, arrays)
        self._schedule.record(model.version, now=self._clock())
        report = self._score(local, data, model, self._settings.split, log)
        if report is None:
            return
        test = None
        if self._test_due():
            test = self._score(local, self._test_dataset, model, self._test_split, log)
        self._evaluations += 1
        if self._best is not None:
            # Before the log: a crash in between re-evaluates this version after a restart,
            # and the store, resumed from disk, does not select an equal score twice.
            self._best.offer(state_arrays(local.model), validation=report, test=test)
        for each in (report, test):
            if each is not None:
                self._eval_log.append(each)
        self.reports_written += 1
        self.last_report = report
        self.last_test_report = test if test is not None else self.last_test_report
        log.info(
            "evaluated",
            split=report.split,
            loss=report.loss,
            accuracy=report.accuracy,
            auc=report.auc,
            test_accuracy=None if test is None else test.accuracy,
        )
        for each in (report, test):
            if each is not None:
                self._publish(each)

    def _test_due(self) -> bool:
        return (
            self._test_split is not None
            and self._test_dataset is not None
            and self._evaluations % self._settings.test_every == 0
        )

    def _score(
        self,
        local: LocalModel,
        data: ImageDataset | None,
        model: GlobalModel,
        split: str | None,
        log: structlog.typing.FilteringBoundLogger,
    ) -> EvalReport | None:
        if data is None or split is None:
            return None
        try:
            result = evaluate(local.model, data, batch_size=self._settings.batch_size)
        except ValueError as error:
            # e.g. NaN outputs from a broken global model (negative BatchNorm variance):
            # that version gets no report, the next one is evaluated as usual.
            log.error("the model cannot be evaluated; no report", split=split, error=str(error))
            return None
        report = build_report(model, result, split=split, task_id=self._task)
        if report is None:
            log.error("the model's loss is not finite; no report", split=split, loss=result.loss)
        return report

    def _publish(self, report: EvalReport) -> None:
        try:
            publish_message(self._bus, EVENTS_EXCHANGE, event_key("eval", self._task), report)
        except TransportError as error:
            # The report is in the log already: a missed event is not a lost result.
            self._log.warning("eval report not published", error=str(error))
