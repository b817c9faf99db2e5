"""Open the RabbitMQ bus a service's settings describe."""

from __future__ import annotations

from pathlib import Path

from services.common.bus import Bus
from services.common.settings import ServiceSettings
from services.common.topology import Topology


def bus_from_settings(settings: ServiceSettings, *, topology: Topology | None = None) -> Bus:
    """A connected `PikaBus` (amqp or amqps); `topology` is re-declared after reconnects."""
    from services.common.bus.pika_bus import PikaBus

    return PikaBus(
        settings.amqp_url,
        ca_file=_text(settings.ca_file),
        cert_file=_text(settings.cert_file),
        key_file=_text(settings.key_file),
        allow_insecure_remote=settings.allow_insecure_remote,
        heartbeat=settings.heartbeat,
        topology=topology,
    )


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)
