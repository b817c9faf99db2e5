"""Poison messages: one that was being handled when the aggregator died is not handled again.

A body that kills the process (out of memory, a crash in native code) is never acked, so
the broker hands it to every restart, which dies the same way. Before handling an update
the aggregator writes the message's fingerprint to a marker file next to its checkpoints
and removes it afterwards; a marker found at start names the message that was in hand
and at how many crashes in a row. One crash proves nothing (an operator's kill, a node
reboot land on whatever update is in hand, and a valid update must not be lost), so the
redelivery is tried once more; a message in hand at `POISON_STRIKES` crashes in a row is
dead-lettered instead. Quorum queues also count deliveries
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
POISON_STRIKES: Final = 2
"""Crashes in a row with the same message in hand that make it poison."""
POISON_REASON: Final = "poison"
MARKER_WIDTH: Final = 256
"""Bytes of one marker record (a fingerprint is at most 128 + 21 + 8 + 2 characters)."""
_BLANK: Final = b" " * MARKER_WIDTH


FINGERPRINT_SPAN: Final = 4 * 1024
"""Bytes at each end of a body the fingerprint covers: hashing a 45 MiB update whole would
cost the hot path tens of milliseconds (128 KiB: 0.1 ms), and a redelivery is
byte-identical anyway."""


def fingerprint(delivery: Delivery) -> str:
    """The message's id, size and a CRC-32 of its two ends: equal for a redelivery."""
    body = delivery.body
    ends = (
        body
        if len(body) <= 2 * FINGERPRINT_SPAN
        else body[:FINGERPRINT_SPAN] + body[-FINGERPRINT_SPAN:]
    )
    return f"{delivery.message_id or '-'}:{len(body)}:{zlib.crc32(ends):08x}"


class PoisonGuard:
    """Remembers the update in hand across a crash; says which redelivery not to touch."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / MARKER_NAME
        self._suspect: str | None = None
        self._strikes = 0
        with contextlib.suppress(FileNotFoundError):
            self._suspect, self._strikes = _parse_marker(marker.read_text())
        if self._suspect is not None:
            log.warning("poison_suspect", fingerprint=self._suspect, crashes=self._strikes)
        # One descriptor for the process's life: rewriting it in place costs microseconds
        # per update, where creating and unlinking a file cost a quarter of a millisecond.
        self._fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def verdict(self, delivery: Delivery) -> str | None:
        """Why `delivery` must not be handled again (a dead-letter detail), or None."""
        count = _delivery_count(delivery)
        if count is not None and count >= MAX_DELIVERIES:
            return f"delivered {count} times without being settled"
        suspect = self._suspect is not None and delivery.redelivered
        if suspect and self._strikes >= POISON_STRIKES and fingerprint(delivery) == self._suspect:
            self._suspect = None
            return (
                f"it was being handled each time the aggregator died ({self._strikes} times "
                "in a row); it is not tried again"
            )
        return None

    @contextlib.contextmanager
    def handling(self, delivery: Delivery) -> Iterator[None]:
        """Mark `delivery` as in hand for the duration (no fsync: a crash of the process,
        not of the machine, is what this guards against, and the page cache survives it)."""
        mark = fingerprint(delivery)
        repeat = self._suspect is not None and mark == self._suspect
        record = f"{mark} {self._strikes + 1 if repeat else 1}"
        # Fixed-width records overwrite each other in place: no metadata change per update.
        os.pwrite(self._fd, record.encode().ljust(MARKER_WIDTH)[:MARKER_WIDTH], 0)
        try:
            yield
        finally:
            os.pwrite(self._fd, _BLANK, 0)
        if repeat:  # it survived this time: no longer a suspect
            self._suspect = None

    def close(self) -> None:
        """Release the marker's descriptor (the empty marker stays: it names nothing)."""
        os.close(self._fd)


def _parse_marker(text: str) -> tuple[str | None, int]:
    """`(fingerprint, crashes)` from a marker record `"<fingerprint> <crashes>"`."""
    words = text.split()
    if not words:
        return None, 0
    if len(words) > 1 and words[-1].isdigit():
        return " ".join(words[:-1]), int(words[-1])
    return " ".join(words), 1


def _delivery_count(delivery: Delivery) -> int | None:
    value = delivery.properties.headers.get(DELIVERY_COUNT_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
