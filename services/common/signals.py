"""SIGTERM/SIGINT handling shared by the long-running services."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType


def on_termination(stop: Callable[[], None]) -> None:
    """Call `stop` on SIGTERM or SIGINT (main thread only); a second signal exits at once."""
    received: list[int] = []

    def handle(signum: int, _frame: FrameType | None) -> None:
        if received:
            raise SystemExit(128 + signum)
        received.append(signum)
        stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
