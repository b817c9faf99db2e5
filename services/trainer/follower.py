"""Reading a follower queue (`fedmq.<task>.follow.<who>`): the newest global model, if any.

The queue holds at most one model (max-length 1, drop-head), but a reconnect or a
publish racing a `get` can leave two; taking every message and keeping the highest
version makes the answer right either way. Garbage is dead-lettered with its reason.
"""

from __future__ import annotations

import structlog

from schemas import DecodeError, GlobalModel
from services.common.bus import Bus, Delivery, TransportError
from services.common.messaging import decode_delivery

WRONG_TASK_REASON = "wrong-task"
"""Dead-letter reason of a model of another task bound to this queue by mistake."""
FOLLOW_POLL_INTERVAL_S = 0.5
"""Pause between two looks at an empty follower queue while waiting for a new model."""


def newest_of(*models: GlobalModel | None) -> GlobalModel | None:
    """The model with the highest version among those given (None if none is given)."""
    present = [m for m in models if m is not None]
    return max(present, key=lambda m: m.version) if present else None


class ModelFollower:
    """Takes the newest `GlobalModel` of one task from one follower queue."""

    def __init__(self, bus: Bus, queue: str, *, task_id: str) -> None:
        self._bus = bus
        self._queue = queue
        self._task_id = task_id
        self._log = structlog.get_logger(__name__).bind(task=task_id, queue=queue)

    def newest(self, *, newer_than: int | None) -> GlobalModel | None:
        """Drain the queue; return its highest version if above `newer_than`, else None.

        Every message taken is settled (acked, or dead-lettered when unreadable).
        """
        best: GlobalModel | None = None
        while (delivery := self._bus.get(self._queue)) is not None:
            model = self._take(delivery)
            if model is not None and (best is None or model.version > best.version):
                best = model
        if best is None or (newer_than is not None and best.version <= newer_than):
            return None
        return best

    def _take(self, delivery: Delivery) -> GlobalModel | None:
        try:
            model = decode_delivery(delivery, (GlobalModel,))
        except DecodeError as error:
            self._discard(delivery, error.reason.value, error.detail)
            return None
        if model.task_id != self._task_id:
            detail = f"model of task {model.task_id!r} on a follower queue of {self._task_id!r}"
            self._discard(delivery, WRONG_TASK_REASON, detail)
            return None
        self._bus.ack(delivery)
        return model

    def _discard(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Dead-letter a foreign message; when this login may not, drop it and go on.

        A least-privilege trainer login has no write permission on `fedmq.dlx`: the refusal
        must not end the trainer (anyone able to put one message in its queue could).
        """
        self._log.warning(
            "foreign message on the follower queue",
            reason=reason,
            detail=detail[:256],
            kind=delivery.kind,
            sender=delivery.properties.user_id,
        )
        try:
            self._bus.dead_letter(delivery, reason=reason, detail=detail)
        except TransportError as error:
            self._log.warning("could not dead-letter it; dropped", error=str(error))
            try:
                self._bus.reject(delivery)
            except TransportError as again:
                self._log.warning("could not drop it either; it comes back", error=str(again))
