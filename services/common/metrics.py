"""Prometheus endpoint helper: every service exposes its own registry on an HTTP port."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server


def serve_metrics(registry: CollectorRegistry, port: int | None) -> int | None:
    """Expose `registry` on `port` (0 picks a free one); return the bound port or None."""
    if port is None:
        return None
    server, _thread = start_http_server(port, registry=registry)
    return int(server.server_port)


def gauge_registry(readings: Mapping[str, tuple[str, Callable[[], float]]]) -> CollectorRegistry:
    """A registry of gauges read on every scrape: `{name: (help, read)}`."""
    registry = CollectorRegistry()
    for name, (description, read) in readings.items():
        Gauge(name, description, registry=registry).set_function(read)
    return registry
