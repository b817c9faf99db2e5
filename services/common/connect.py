"""Open the RabbitMQ bus a service's settings describe."""

from __future__ import annotations

import threading
from pathlib import Path

from services.common.bus import Bus, NotFound
from services.common.settings import ServiceSettings
from services.common.topology import QueueType, Topology, own_follower_topology

FOLLOWER_DECLARE_RETRY_S = 2.0
"""How often a follower retries while the models exchange does not exist yet."""


def bus_from_settings(settings: ServiceSettings, *, topology: Topology | None = None) -> Bus:
    """A connected `PikaBus` (amqp or amqps) on the settings' broker node(s); `topology` is
    re-declared after reconnects."""
    from services.common.bus.pika_bus import PikaBus

    return PikaBus(
        settings.broker_urls,
        ca_file=_text(settings.ca_file),
        cert_file=_text(settings.cert_file),
        key_file=_text(settings.key_file),
        allow_insecure_remote=settings.allow_insecure_remote,
        heartbeat=settings.heartbeat,
        connect_timeout=settings.connect_timeout,
        topology=topology,
    )


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def declare_follower(
    bus: Bus,
    task_id: str,
    follower_id: str,
    *,
    queue_type: QueueType = "classic",
    stop: threading.Event | None = None,
) -> bool:
    """Declare this follower's queue, waiting while no aggregator has created the exchanges.

    Returns False when `stop` was set before the queue could be declared.
    """
    stop = stop or threading.Event()
    topology = own_follower_topology(task_id, follower_id, queue_type=queue_type)
    while not stop.is_set():
        try:
            bus.declare(topology)
        except NotFound:
            stop.wait(FOLLOWER_DECLARE_RETRY_S)
            continue
        return True
    return False
