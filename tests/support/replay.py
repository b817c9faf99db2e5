"""Exactly-once evidence that does not trust the aggregator: a copy of every update sent, and
the weights those updates give when replayed in the order the aggregator says it applied them.

A `BrokerTap` bound to `fedmq.updates` receives from the broker a copy of every update any
trainer published (a trainer's retry is one more copy of the same update id).
`replay_weights` folds the copies into a fresh model with the pure aggregation code; if
the aggregator lost an update or applied one twice, its weights differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pika

from schemas import ModelUpdate, decode
from services.aggregator.bootstrap import load_core
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.task import TaskDefinition, load_task, with_consistent_spec

TAP_INACTIVITY_S = 2.0
"""The tap is drained once no copy arrived for this long."""


@dataclass
class BrokerTap:
    """A durable queue of the test's own (quorum: it outlives a node) bound before the test
    acts, so it receives a copy of every message published to `exchange` with `key`."""

    amqp_url: str
    queue: str
    exchange: str
    key: str
    queue_type: str = "quorum"

    def declare(self) -> None:
        """Create and bind the queue; from now on every matching message is copied into it."""
        with _channel(self.amqp_url) as channel:
            channel.queue_declare(
                self.queue, durable=True, arguments={"x-queue-type": self.queue_type}
            )
            channel.queue_bind(self.queue, self.exchange, self.key)

    def drain(self) -> list[bytes]:
        """Take every copy out, in the order the broker queued them, and delete the queue."""
        bodies: list[bytes] = []
        with _channel(self.amqp_url) as channel:
            channel.basic_qos(prefetch_count=64)
            for method, _properties, body in channel.consume(
                self.queue, inactivity_timeout=TAP_INACTIVITY_S
            ):
                if method is None:
                    break
                bodies.append(body)
                channel.basic_ack(method.delivery_tag)
            channel.cancel()
            channel.queue_delete(self.queue)
        return bodies


def updates_by_id(bodies: Iterable[bytes]) -> dict[str, ModelUpdate]:
    """Decoded updates by id; copies of one id (a publisher's retry) must be identical."""
    found: dict[str, ModelUpdate] = {}
    for body in bodies:
        update = decode(body, accept=(ModelUpdate,))
        assert isinstance(update, ModelUpdate)
        known = found.setdefault(update.update_id, update)
        assert known == update, f"two different updates share the id {update.update_id}"
    return found


class _channel:
    """One connection's channel for a `with` block."""

    def __init__(self, url: str) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(url))

    def __enter__(self) -> Any:
        return self._connection.channel()

    def __exit__(self, *_exc: object) -> None:
        if self._connection.is_open:
            self._connection.close()


def task_of(task_file: Path) -> TaskDefinition:
    """The task as the aggregator reads it from `task_file`."""
    return with_consistent_spec(load_task(task_file))


def replay_weights(
    task: TaskDefinition,
    updates: Mapping[str, ModelUpdate],
    applied_order: Iterable[str],
    *,
    scratch: Path,
) -> np.ndarray:
    """Fresh weights with the updates applied once each, in `applied_order`, by the pure core."""
    core = load_core(task, CheckpointStore(scratch))
    assert core.version == 0, "the replay must start from the task's initial weights"
    for update_id in applied_order:
        update = updates[update_id]
        core.submit(update, redelivered=False, now=update.created_at)
    return np.asarray(core.weights)
