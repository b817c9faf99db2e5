"""Poison messages: one that was being handled when the aggregator died is not handled again.

A body that kills the process (out of memory, a crash in native code) is never acked, so
the broker hands it to every restart, which dies the same way. Before handling an update
the aggregator writes the message's fingerprint to a marker file next to its checkpoints
and removes it afterwards; a marker found at start names the message that was in hand,
and its redelivery is dead-lettered instead. Quorum queues also count deliveries
(`x-delivery-count`), a second, broker-side signal.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import structlog

from services.common.bus import Delivery

log = structlog.get_logger(__name__)

MARKER_NAME: Final = "in-flight.marker"
"""File in the checkpoint directory naming the update being handled."""
DELIVERY_COUNT_HEADER: Final = "x-delivery-count"
"""Set by quorum queues on a redelivery: how many times the message was delivered before."""
MAX_DELIVERIES: Final = 10
"""A message delivered this many times without being settled is poison. Each aggregator
crash also redelivers the updates merely waiting in its window, so the bound is well above
the restarts a healthy federation sees."""
POISON_REASON: Final = "poison"


def fingerprint(delivery: Delivery) -> str:
    """The message's id, size and CRC-32: equal for a redelivery, different for anything else."""
    crc = zlib.crc32(delivery.body)
    return f"{delivery.message_id or '-'}:{len(delivery.body)}:{crc:08x}"


class PoisonGuard:
    """Remembers the update in hand across a crash; says which redelivery not to touch."""

    def __init__(self, directory: Path) -> None:
        self._marker = directory / MARKER_NAME
        self._suspect: str | None = None
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._suspect = self._marker.read_text().strip() or None
            self._marker.unlink()
            log.warning("poison_suspect", fingerprint=self._suspect)

    def verdict(self, delivery: Delivery) -> str | None:
        """Why `delivery` must not be handled again (a dead-letter detail), or None."""
        count = _delivery_count(delivery)
        if count is not None and count >= MAX_DELIVERIES:
            return f"delivered {count} times without being settled"
        suspect = self._suspect is not None and delivery.redelivered
        if suspect and fingerprint(delivery) == self._suspect:
            self._suspect = None
            return "it was being handled when the aggregator died; it is not tried again"
        return None

    @contextlib.contextmanager
    def handling(self, delivery: Delivery) -> Iterator[None]:
        """Mark `delivery` as in hand for the duration (no fsync: a crash of the process,
        not of the machine, is what this guards against, and the page cache survives it)."""
        self._marker.write_text(fingerprint(delivery))
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marker)


def _delivery_count(delivery: Delivery) -> int | None:
    value = delivery.properties.headers.get(DELIVERY_COUNT_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
