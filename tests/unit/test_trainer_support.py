"""Shared fakes for the trainer and evaluator unit tests (no tests here).

A fake aggregator answering joins on an `InMemoryBus`, a tiny task spec and generated
images, and helpers to read what the participants published.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from schemas import (
    GlobalModel,
    JoinAccepted,
    JoinRequest,
    Message,
    ModelUpdate,
    Rejection,
    TaskSpec,
    Tensor,
    encode,
)
from services.common.bus import Delivery, InMemoryBus
from services.common.data import ImageDataset
from services.common.messaging import decode_delivery, envelope_headers, publish_message
from services.common.models import build_model, state_arrays
from services.common.topology import (
    EVENTS_EXCHANGE,
    MODELS_EXCHANGE,
    BindingSpec,
    QueueSpec,
    Topology,
    control_queue,
    model_key,
    task_topology,
    updates_queue,
)
from tests.datagen import make_images

TASK = "pneumonia"
IMAGE_SIZE = 8
EVENTS_TAP = "test.events"


def tiny_spec(**overrides: Any) -> TaskSpec:
    """A cnn-small task on 8 x 8 greyscale images: a round takes milliseconds."""
    fields: dict[str, Any] = {
        "task_id": TASK,
        "model": "cnn-small",
        "num_classes": 2,
        "in_channels": 1,
        "image_size": IMAGE_SIZE,
        "batch_size": 8,
        "heartbeat_interval": 0.05,
        "seed": 3,
    }
    fields.update(overrides)
    return TaskSpec.model_validate(fields)


def tiny_dataset(count: int = 24, *, seed: int = 0) -> ImageDataset:
    """Generated two-class images with a learnable blob, `count` of them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count).astype(np.int64)
    images = make_images(labels, num_classes=2, size=IMAGE_SIZE, rng=rng)
    return ImageDataset(images, labels, num_classes=2)


def global_model(spec: TaskSpec, version: int, *, seed: int | None = None) -> GlobalModel:
    """Version `version` of the task's model, initialised with `seed` (default: the spec's)."""
    model = build_model(
        spec.model,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        seed=spec.seed if seed is None else seed,
    )
    tensors = tuple(Tensor.from_numpy(n, a) for n, a in state_arrays(model).items())
    return GlobalModel(task_id=spec.task_id, version=version, tensors=tensors)


class FakeAggregator:
    """Answers join requests with the spec and its current model; publishes models on demand."""

    def __init__(
        self,
        bus: InMemoryBus,
        spec: TaskSpec,
        model: GlobalModel,
        *,
        refuse: Rejection | None = None,
        max_update_bytes: int | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.model = model
        self.refuse = refuse
        self.joins: list[JoinRequest] = []
        self._events: list[Any] = []
        topology = (
            task_topology(spec.task_id, max_update_bytes=max_update_bytes)
            if max_update_bytes is not None
            else task_topology(spec.task_id)
        )
        tap = QueueSpec(
            name=EVENTS_TAP, durable=False, bindings=(BindingSpec(EVENTS_EXCHANGE, "#"),)
        )
        bus.declare(topology.merge(Topology(queues=(tap,))))
        self._consumer = bus.consume(control_queue(spec.task_id), self._on_join, prefetch=1)

    def stop_answering(self) -> None:
        """Stop consuming join requests (as if the aggregator went away)."""
        self.bus.cancel(self._consumer)

    def _on_join(self, delivery: Delivery) -> None:
        request = decode_delivery(delivery, (JoinRequest,))
        self.joins.append(request)
        reply: Message = self.refuse or JoinAccepted(spec=self.spec, model=self.model)
        self.bus.reply(delivery, encode(reply), kind=reply.kind, headers=envelope_headers())
        self.bus.ack(delivery)

    def publish_model(self, model: GlobalModel, *, current: bool = True) -> None:
        """Publish `model` on `fedmq.models` (to every follower queue); joins then get it."""
        if current:
            self.model = model
        publish_message(self.bus, MODELS_EXCHANGE, model_key(model.task_id), model)

    def take_updates(self) -> list[tuple[Delivery, ModelUpdate]]:
        """Every update waiting in the task's queue, acknowledged."""
        return drain(self.bus, updates_queue(self.spec.task_id), (ModelUpdate,))

    def events(self, kind: type[Any]) -> list[Any]:
        """Every event of one kind published on `fedmq.events` so far, in order."""
        self._events.extend(m for _, m in drain(self.bus, EVENTS_TAP, None))
        return [m for m in self._events if isinstance(m, kind)]


def drain(bus: InMemoryBus, queue: str, accept: tuple[type[Any], ...] | None) -> list[Any]:
    """`(delivery, message)` for every message in `queue`, acknowledged."""
    from schemas import decode

    taken = []
    while (delivery := bus.get(queue)) is not None:
        bus.ack(delivery)
        message = decode(delivery.body, accept=accept) if accept else decode(delivery.body)
        taken.append((delivery, message))
    return taken


def wait_until(condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class Background:
    """Run `target()` on a thread and keep its return value (or exception)."""

    def __init__(self, target: Callable[[], int]) -> None:
        self.result: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], int]) -> None:
        try:
            self.result = target()
        except BaseException as error:
            self.error = error

    def join(self, timeout: float = 30.0) -> int:
        """Wait for the thread; its return value (re-raises what it raised)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the service did not finish in time"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
