"""A trainer-less test client: joins a task, publishes hand-made updates, reads what comes back."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np
import pika

from schemas import (
    CONTENT_TYPE,
    GlobalModel,
    JoinAccepted,
    JoinRequest,
    ModelUpdate,
    Rejection,
    Tensor,
)
from services.common.bus import Bus
from services.common.messaging import call_message, decode_delivery, publish_message
from services.common.settings import DEFAULT_AMQP_URL
from services.common.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DETAIL_HEADER,
    REASON_HEADER,
    UPDATES_EXCHANGE,
    BindingSpec,
    QueueSpec,
    Topology,
    follower_queue,
    follower_topology,
    join_key,
    update_key,
)


@dataclass(frozen=True)
class DeadLetter:
    """One message seen in the dead-letter exchange, with fedmq's reason headers."""

    message_id: str | None
    reason: str
    detail: str


class FederationProbe:
    """Plays a trainer by hand: every delta and every version is chosen by the test."""

    def __init__(
        self, bus: Bus, task_id: str, trainer_id: str, *, amqp_url: str = DEFAULT_AMQP_URL
    ) -> None:
        self.bus = bus
        self.amqp_url = amqp_url
        self.task_id = task_id
        self.trainer_id = trainer_id
        self.follower = follower_queue(task_id, trainer_id).name
        self.latest: GlobalModel | None = None
        self.versions_seen: list[int] = []
        """Every version read from the follower queue, in arrival order."""
        # A private tap on the dead-letter exchange: `fedmq.dead` is shared by every test.
        self.dead_tap = f"test.dead.{uuid.uuid4().hex[:12]}"
        tap = QueueSpec(
            name=self.dead_tap,
            durable=False,
            auto_delete=True,
            bindings=(BindingSpec(DEAD_LETTER_EXCHANGE, ""),),
        )
        bus.declare(follower_topology(task_id, trainer_id).merge(Topology(queues=(tap,))))

    def join(
        self, *, timeout: float = 120.0, as_id: str | None = None, user_id: str | None = None
    ) -> JoinAccepted:
        """Join by RPC, retrying while no aggregator answers yet.

        `as_id`/`user_id`: join under another id, vouched for by the broker login `user_id`
        (an aggregator with per-site logins answers only a join whose id is its login).
        """
        trainer_id = as_id or self.trainer_id
        request = JoinRequest(task_id=self.task_id, trainer_id=trainer_id, num_examples=100)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = call_message(
                    self.bus,
                    CONTROL_EXCHANGE,
                    join_key(self.task_id),
                    request,
                    accept=(JoinAccepted, Rejection),
                    timeout=5.0,
                    user_id=user_id,
                )
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            assert isinstance(reply, JoinAccepted), f"join refused: {reply}"
            return reply

    def update(
        self,
        model: GlobalModel,
        fill: float,
        *,
        base_version: int | None = None,
        num_examples: int = 100,
        **fields: object,
    ) -> ModelUpdate:
        """An update whose delta is `fill` in every float coordinate of `model`."""
        delta = tuple(
            Tensor.from_numpy(t.name, np.full(t.shape, fill, np.float32))
            for t in model.tensors
            if t.dtype.startswith("float")
        )
        values: dict[str, object] = {
            "task_id": self.task_id,
            "trainer_id": self.trainer_id,
            "base_version": model.version if base_version is None else base_version,
            "num_examples": num_examples,
            "delta": delta,
        }
        values.update(fields)
        return ModelUpdate.model_validate(values)

    def publish(self, update: ModelUpdate) -> str:
        """Publish an update with confirms; returns the AMQP message id."""
        return publish_message(
            self.bus, UPDATES_EXCHANGE, update_key(self.task_id, update.trainer_id), update
        )

    def publish_raw(
        self,
        body: bytes,
        *,
        kind: str | None = "model_update",
        content_type: str | None = CONTENT_TYPE,
        headers: dict[str, object] | None = None,
    ) -> str:
        """Publish arbitrary bytes and properties with bare pika (hostile-input tests)."""
        message_id = uuid.uuid4().hex
        properties = pika.BasicProperties(
            content_type=content_type,
            type=kind,
            message_id=message_id,
            headers=headers,
            delivery_mode=2,
        )
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                UPDATES_EXCHANGE, update_key(self.task_id, self.trainer_id), body, properties
            )
        finally:
            connection.close()
        return message_id

    def newest_model(self, *, min_version: int = 0, timeout: float = 30.0) -> GlobalModel:
        """The newest model in the follower queue once its version reaches `min_version`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            delivery = self.bus.get(self.follower)
            if delivery is None:
                newest = self.latest
                if newest is not None and newest.version >= min_version:
                    return newest
                time.sleep(0.1)
                continue
            self.bus.ack(delivery)
            model = decode_delivery(delivery, (GlobalModel,))
            self.versions_seen.append(model.version)
            if self.latest is None or model.version > self.latest.version:
                self.latest = model
        seen = None if self.latest is None else self.latest.version
        raise AssertionError(f"no model with version >= {min_version} (newest seen: {seen})")

    def dead_letters(self, *, expected: int = 0, timeout: float = 20.0) -> list[DeadLetter]:
        """Dead letters seen so far; waits until at least `expected` arrived."""
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + timeout
        while True:
            delivery = self.bus.get(self.dead_tap)
            if delivery is not None:
                self.bus.ack(delivery)
                headers = delivery.properties.headers
                letters.append(
                    DeadLetter(
                        message_id=delivery.message_id,
                        reason=str(headers.get(REASON_HEADER, "")),
                        detail=str(headers.get(DETAIL_HEADER, "")),
                    )
                )
                continue
            if len(letters) >= expected or time.monotonic() > deadline:
                return letters
            time.sleep(0.1)
