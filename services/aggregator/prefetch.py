"""How many updates the aggregator holds unacked: a window sized in bytes, not in messages.

Updates are acked only once a checkpoint holds their effect, so the window must cover the
updates that arrive while a commit (checkpoint, publish, confirm) is in flight, or the
broker stops delivering and the aggregator waits. A fixed count is either too small for a
1.6 MiB CNN (16 held: 0.48 of a bare consumer's rate, 64: 0.71) or too large for a
45 MiB ResNet (64 held = 2.9 GiB); a byte budget suits both.
"""

from __future__ import annotations

from schemas import Precision

DEFAULT_PREFETCH_BYTES = 512 * 1024 * 1024
"""Bytes of unacked updates held at once when no explicit prefetch is set."""
MAX_PREFETCH = 128
"""Beyond this many held updates the ingest rate no longer rises (benchmarks/ingest.py)."""

_ITEMSIZE: dict[Precision, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


def update_bytes(float_elements: int, precision: Precision) -> int:
    """Approximate wire size of one update: its delta tensors at the task's precision."""
    return max(1, float_elements * _ITEMSIZE[precision])


def update_prefetch(
    *, explicit: int | None, budget_bytes: int, message_bytes: int, buffer_size: int
) -> int:
    """Updates to hold unacked: `explicit`, else what fits in `budget_bytes` (at most
    `MAX_PREFETCH`); never fewer than twice the strategy's buffer, so a buffer can fill
    while the previous one is being committed."""
    floor = 2 * buffer_size
    if explicit is not None:
        return max(explicit, floor)
    return max(floor, min(MAX_PREFETCH, budget_bytes // max(message_bytes, 1)))
