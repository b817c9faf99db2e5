"""One federated run in virtual time: the real aggregator core, trainers' rounds, evaluator.

Semantics of the real system: a trainer takes the newest published version when it
starts, its update arrives `duration` later, the aggregator applies updates in arrival
order, and the trainer starts again at once on the newest version (under the FedAvg
barrier it waits for the next version instead).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.study.attacks import delta_norm, scaled_update
from benchmarks.study.data import StudyData
from benchmarks.study.evaluation import EvalRecorder
from benchmarks.study.schedule import Arrival, ArrivalQueue, EvalTicks
from benchmarks.study.sites import SITE_SEED_STRIDE, Site, samples_in_steps
from benchmarks.study.spec import RunSpec, StudySettings, task_definition
from benchmarks.study.timing import TimeModel
from schemas import DecodeError, ModelUpdate, decode, encode
from services.aggregator.accounting import privacy_accountant
from services.aggregator.bootstrap import initial_layout_and_weights
from services.aggregator.core import AggregatorCore, global_model_of
from services.aggregator.strategies.factory import build_strategy
from services.aggregator.task import TaskDefinition
from services.aggregator.validation import RejectedUpdate
from services.common.training import TrainResult
from services.evaluator.averaging import VersionAverage
from services.report.manifest import RunManifest
from services.trainer.local_model import DeltaNotFinite, LocalModel
from services.trainer.local_round import build_update, round_seed, run_local_round

DP_DELTA = 1e-5


class FederatedRun:
    """Drives the core with updates in virtual-time order; logs evaluations as it goes."""

    def __init__(
        self,
        run: RunSpec,
        settings: StudySettings,
        data: StudyData,
        timing: TimeModel,
        run_dir: Path,
    ) -> None:
        self.run = run
        self.settings = settings
        self.timing = timing
        self.task = task_definition(run, settings, task_id=_task_id(run.name))
        self.core = _core(self.task)
        self.sites = _sites(run, settings, data)
        self.local = LocalModel(self.task.spec)
        self.recorder = EvalRecorder(
            run_dir=run_dir, manifest=self._manifest(), spec=self.task.spec, test=data.test
        )
        self.queue: ArrivalQueue[ModelUpdate | None] = ArrivalQueue()
        self.ticks = EvalTicks(every=settings.eval_every_s, budget=settings.budget_s)
        self.published_at = {0: 0.0}
        self.rejections: Counter[str] = Counter()
        self.staleness: list[int] = []
        self.honest_norms: list[float] = []
        self.waiting: list[Site] = []
        self._stop = threading.Event()  # never set: a simulated round always finishes
        self.ema: VersionAverage | None = (
            None if run.served_ema is None else VersionAverage(decay=run.served_ema)
        )

    def execute(self) -> dict[str, Any]:
        """Run to the budget; return the run's statistics (its evaluations are in the log)."""
        budget = self.settings.budget_s
        self._evaluate(0.0)
        for site in self.sites:
            self._start(site, now=0.0)
        while self.queue.peek_time() <= budget:
            arrival = self.queue.pop()
            self._evaluate_until(arrival.at)
            self._deliver(arrival)
        self._evaluate_until(budget)
        return self._statistics()

    # -- trainers ----------------------------------------------------------------------

    def _start(self, site: Site, *, now: float) -> None:
        """Site takes the newest version and trains one round; its update is put in flight."""
        recipe = self.settings.recipe
        samples = samples_in_steps(len(site.data), recipe.batch_size, recipe.steps)
        duration = self.timing.update_seconds(samples, slowdown=site.slowdown)
        if now + duration > self.settings.budget_s:
            return  # it would arrive after the end: skip the compute, not the outcome
        model = self.core.global_model()
        self.local.load_global(model)
        site.base_version = model.version
        result = run_local_round(
            self.local, site.data, seed=round_seed(site.seed, site.rounds), stop=self._stop
        )
        if result.examples_seen != samples:
            raise RuntimeError(
                f"{site.trainer_id} trained {result.examples_seen} examples, the clock assumed"
                f" {samples}: the virtual duration would be wrong"
            )
        site.rounds += 1
        site.durations.append(duration)
        site.busy_s += duration
        self.queue.push(now + duration, site.index, self._update(site, result))

    def _update(self, site: Site, result: TrainResult) -> ModelUpdate | None:
        try:
            update = build_update(
                self.local, result, trainer_id=site.trainer_id,
                update_id=f"{site.trainer_id}.{site.rounds}",
            )  # fmt: skip
        except DeltaNotFinite:
            return None  # the trainer does not send a diverged delta; it simply goes on
        if site.attack_scale is None:
            self.honest_norms.append(delta_norm(update))
            return update
        return scaled_update(update, site.attack_scale)

    # -- aggregator --------------------------------------------------------------------

    def _deliver(self, arrival: Arrival[ModelUpdate | None]) -> None:
        site = self.sites[arrival.site]
        version = self.core.version
        if arrival.payload is not None:
            self._submit(site, arrival.payload, now=arrival.at)
        self.core.poll(now=arrival.at)
        if self.core.version != version:
            self.published_at[self.core.version] = arrival.at
            if self.ema is not None:
                self.ema.observe(self.core.weights, version=self.core.version)
        self._restart(site, now=arrival.at)

    def _submit(self, site: Site, update: ModelUpdate, *, now: float) -> None:
        try:
            # Through the codec as over the wire: the same checks (finite values, shapes).
            received = decode(encode(update), accept=(ModelUpdate,))
            outcome = self.core.submit(received, redelivered=False, now=now)
        except (RejectedUpdate, DecodeError) as error:
            self.rejections[str(error.reason)] += 1
            site.rejected += 1
            return
        site.delivered += 1
        self.staleness.append(outcome.staleness)

    def _restart(self, site: Site, *, now: float) -> None:
        if not self.task.spec.synchronous:
            self._start(site, now=now)
            return
        # Round barrier: a trainer trains once per version, then waits for the next one.
        self.waiting.append(site)
        ready = [s for s in self.waiting if s.base_version < self.core.version]
        self.waiting = [s for s in self.waiting if s not in ready]
        for waiting_site in ready:
            self._start(waiting_site, now=now)

    # -- evaluator ---------------------------------------------------------------------

    def _evaluate_until(self, now: float) -> None:
        for tick in self.ticks.due(now):
            if self.recorder.last_version != self.core.version:
                self._evaluate(tick)

    def _evaluate(self, tick: float) -> None:
        version = self.core.version
        model = self.core.global_model()
        if self.ema is not None and self.ema.weights is not None:
            saved = dataclasses.replace(self.core.checkpoint(), weights=self.ema.weights)
            model = global_model_of(self.task.task_id, self.core.layout, saved)
        self.recorder.record(model, published_at=self.published_at[version], evaluated_at=tick)

    # -- output ------------------------------------------------------------------------

    def _manifest(self) -> RunManifest:
        spec = self.task.spec
        config = {
            **self.run.describe(),
            "local_steps": spec.local_steps,
            "batch_size": spec.batch_size,
            "learning_rate": spec.learning_rate,
            "logit_adjustment": spec.logit_adjustment,
            "optimizer": spec.optimizer,
            "momentum": spec.momentum,
            "clock": "virtual",
        }
        return RunManifest(
            name=self.run.name, kind="federated", strategy=self.task.strategy.name,
            model=spec.model, started_at=0.0, config=config,
        )  # fmt: skip

    def _statistics(self) -> dict[str, Any]:
        times = [self.published_at[v] for v in sorted(self.published_at)]
        epsilon = self.core.epsilon
        return {
            "versions": self.core.version,
            "updates_applied": self.core.updates_applied,
            "updates_rejected": self.core.updates_rejected,
            "rejections": dict(self.rejections),
            "mean_staleness": float(np.mean(self.staleness)) if self.staleness else 0.0,
            "max_staleness": max(self.staleness, default=0),
            "median_honest_update_norm": float(np.median(self.honest_norms))
            if self.honest_norms
            else None,
            "version_intervals_s": [b - a for a, b in itertools.pairwise(times)],
            "epsilon": _json_epsilon(epsilon),
            "dp_delta": DP_DELTA if epsilon is not None else None,
            "diverged_versions": self.recorder.diverged_versions,
            "sites": [site.summary() for site in self.sites],
        }


def _core(task: TaskDefinition) -> AggregatorCore:
    layout, weights, integers = initial_layout_and_weights(task)
    strategy = build_strategy(task.strategy)
    return AggregatorCore(
        task=task, layout=layout, weights=weights, integers=integers, strategy=strategy,
        accountant=privacy_accountant(strategy, delta=DP_DELTA),
    )  # fmt: skip


def _sites(run: RunSpec, settings: StudySettings, data: StudyData) -> list[Site]:
    parts = data.sites(run.partition, settings.sites)
    return [
        Site(
            index=i,
            data=part,
            slowdown=run.slowdown_of(i, settings),
            attack_scale=run.attack_of(i, settings),
            seed=settings.seed * SITE_SEED_STRIDE + i,
        )
        for i, part in enumerate(parts)
    ]


def _json_epsilon(epsilon: float | None) -> float | str | None:
    # z = 0 spends an infinite epsilon; JSON has no infinity.
    return "inf" if epsilon is not None and math.isinf(epsilon) else epsilon


def _task_id(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-" else "-" for c in name)
    return cleaned[:64] or "study"
