"""The aggregator's Prometheus metrics, observed through small hook methods."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
APPLY_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AggregatorMetrics:
    """Counters and gauges of one aggregator (its own registry: tests may run several)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, task_id: str | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        if task_id is not None:
            # One series naming the task: dashboards join on it (`* on() group_left(task)`).
            Gauge(
                "fedmq_aggregator_info", "The task this aggregator serves", ["task"],
                registry=self.registry,
            ).labels(task=task_id).set(1)  # fmt: skip
        self.accepted = Counter(
            "fedmq_updates_accepted", "Updates admitted into the model", registry=self.registry
        )
        self.rejected = Counter(
            "fedmq_updates_rejected",
            "Messages dead-lettered, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.staleness = Histogram(
            "fedmq_update_staleness",
            "Staleness of admitted updates (versions)",
            buckets=STALENESS_BUCKETS,
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            "fedmq_update_apply_seconds",
            "Decode + validate + apply time per update",
            buckets=APPLY_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.version = Gauge(
            "fedmq_model_version", "Newest durable global version", registry=self.registry
        )
        self.trainers = Gauge(
            "fedmq_connected_trainers", "Trainers heard from recently", registry=self.registry
        )
        self.loop_tick = Gauge(
            "fedmq_main_loop_last_tick_seconds",
            "Unix time the main loop last went round (the health check fails when it is old)",
            registry=self.registry,
        )
        self.checkpoint_seconds = Histogram(
            "fedmq_checkpoint_seconds", "Time to write one checkpoint", registry=self.registry
        )

    def on_accepted(self, *, staleness: int, seconds: float) -> None:
        """An update passed validation and reached the strategy."""
        self.accepted.inc()
        self.staleness.observe(staleness)
        self.apply_seconds.observe(seconds)

    def on_rejected(self, reason: str) -> None:
        """A message went to the dead-letter queue."""
        self.rejected.labels(reason=reason).inc()

    def on_committed(self, *, version: int, seconds: float) -> None:
        """A checkpoint reached the disk."""
        self.version.set(version)
        self.checkpoint_seconds.observe(seconds)

    def on_tick(self) -> None:
        """The main loop went round once (a delivery handled, or a wait timed out)."""
        self.loop_tick.set_to_current_time()

    def on_trainers(self, count: int) -> None:
        """The number of active trainers changed."""
        self.trainers.set(count)
