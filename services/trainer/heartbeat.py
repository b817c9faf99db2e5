"""A timer thread that publishes `Heartbeat` events while a participant runs.

The state it reports (training / waiting / ...) is read from a `Status` the service
updates; a failed heartbeat is logged and the next one is tried on time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import structlog

from schemas import Heartbeat
from services.common.bus import Bus, TransportError
from services.common.messaging import publish_message
from services.common.topology import EVENTS_EXCHANGE, event_key

HEARTBEAT_STOP_WAIT_S = 5.0
"""How long `stop` waits for a heartbeat stuck in a publish (the broker is away)."""

Role = Literal["trainer", "aggregator", "evaluator"]


@dataclass
class Status:
    """What a participant is doing now; written by its main thread, read by the heartbeat.

    Single attribute assignments are atomic in CPython, and a heartbeat that mixes two
    consecutive states is harmless.
    """

    state: str = "starting"
    model_version: int | None = None
    updates_sent: int = 0


class HeartbeatSender:
    """Publishes `Heartbeat` on `heartbeat.<task>.<sender>` every `interval` seconds."""

    def __init__(
        self,
        bus: Bus,
        *,
        task_id: str,
        sender_id: str,
        role: Role,
        interval: float,
        status: Status,
        user_id: str | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval}")
        self._bus = bus
        self._task_id = task_id
        self._user_id = user_id
        self._sender_id = sender_id
        self._role: Role = role
        self._interval = interval
        self._status = status
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedmq-heartbeat", daemon=True)
        self._log = structlog.get_logger(__name__).bind(task=task_id, who=sender_id)

    def start(self) -> None:
        """Send one heartbeat now, then one every interval on a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sending; waits a little for a heartbeat being published (daemon thread)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(HEARTBEAT_STOP_WAIT_S)

    def beat(self) -> None:
        """Publish one heartbeat now (transport errors are logged, not raised)."""
        heartbeat = Heartbeat(
            task_id=self._task_id,
            sender_id=self._sender_id,
            role=self._role,
            state=self._status.state,
            model_version=self._status.model_version,
            updates_sent=self._status.updates_sent,
        )
        try:
            publish_message(
                self._bus,
                EVENTS_EXCHANGE,
                event_key("heartbeat", self._task_id, self._sender_id),
                heartbeat,
                persistent=False,
                user_id=self._user_id,
            )
        except TransportError as error:
            self._log.warning("heartbeat not sent", error=str(error))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.beat()
            self._stopping.wait(self._interval)
