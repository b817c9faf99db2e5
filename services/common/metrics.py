"""Prometheus endpoint helper: every service exposes its own registry on an HTTP port.

Each registry carries the process's own `process_*` metrics, and every fedmq series a
service reads from its state is labelled with the task, so one Prometheus can tell tasks
apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import structlog
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Reading = tuple[str, Callable[[], float]]
"""(help, read): a value read from the service at every scrape."""

log = structlog.get_logger(__name__)


def serve_metrics(registry: CollectorRegistry, port: int | None) -> int | None:
    """Expose `registry` on `port` (0 picks a free one); log and return the bound port."""
    if port is None:
        return None
    server, _thread = start_http_server(port, registry=registry)
    bound = int(server.server_port)
    log.info("metrics_serving", port=bound, path="/metrics")
    return bound


def process_registry() -> CollectorRegistry:
    """A registry with the process's `process_*` and `python_info` metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def readings_registry(
    task_id: str,
    *,
    counters: Mapping[str, Reading] | None = None,
    gauges: Mapping[str, Reading] | None = None,
) -> CollectorRegistry:
    """`process_registry()` plus counters and gauges read at every scrape, labelled `task`.

    Counter names are given without `_total`; the exposition adds it.
    """
    registry = process_registry()
    registry.register(_Readings(task_id, counters or {}, gauges or {}))
    return registry


def gauge_registry(readings: Mapping[str, Reading]) -> CollectorRegistry:
    """A registry of gauges read on every scrape: `{name: (help, read)}`."""
    registry = CollectorRegistry()
    for name, (description, read) in readings.items():
        Gauge(name, description, registry=registry).set_function(read)
    return registry


class _Readings(Collector):
    def __init__(
        self, task_id: str, counters: Mapping[str, Reading], gauges: Mapping[str, Reading]
    ) -> None:
        self._task_id = task_id
        self._counters = dict(counters)
        self._gauges = dict(gauges)

    def collect(self) -> Iterator[Metric]:
        for name, (description, read) in self._counters.items():
            counter = CounterMetricFamily(name, description, labels=["task"])
            counter.add_metric([self._task_id], read())
            yield counter
        for name, (description, read) in self._gauges.items():
            gauge = GaugeMetricFamily(name, description, labels=["task"])
            gauge.add_metric([self._task_id], read())
            yield gauge
