"""Follow a task's events on `fedmq.events` through a private, self-deleting queue."""

from __future__ import annotations

import uuid

from schemas import (
    DecodeError,
    EvalReport,
    Heartbeat,
    ModelPublished,
    Rejection,
    TrainerJoined,
    TrainerLeft,
)
from services.common.bus import Bus
from services.common.messaging import decode_delivery
from services.common.topology import Topology, events_queue
from services.demo.status import FederationStatus

EVENT_KINDS = (ModelPublished, EvalReport, TrainerJoined, TrainerLeft, Heartbeat, Rejection)
MAX_EVENTS_PER_POLL = 500


class EventWatcher:
    """Drains the events of one task into a `FederationStatus`."""

    def __init__(self, bus: Bus, status: FederationStatus) -> None:
        self._bus = bus
        self.status = status
        self._queue = events_queue(f"watch-{uuid.uuid4().hex[:8]}", status.task_id)
        bus.declare(Topology(queues=(self._queue,)))

    def poll(self) -> int:
        """Fold every waiting event into the status; return how many were read."""
        count = 0
        while count < MAX_EVENTS_PER_POLL:
            delivery = self._bus.get(self._queue.name)
            if delivery is None:
                break
            self._bus.ack(delivery)
            count += 1
            try:
                self.status.observe(decode_delivery(delivery, EVENT_KINDS))
            except DecodeError:
                continue  # an event kind this watcher does not show
        return count

    def close(self) -> None:
        """Delete the private queue."""
        self._bus.delete_queue(self._queue.name)
