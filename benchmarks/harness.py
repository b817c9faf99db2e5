"""Shared pieces of the broker benchmarks: valid updates, raw publishing, a real aggregator
process, a tap on its events, and the JSON report around them.

Everything here talks to RabbitMQ with plain pika, independently of the code under test,
so the baselines and the aggregator are measured through the same client.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pika

from schemas import (
    CONTENT_TYPE,
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    ModelPublished,
    ModelUpdate,
    Precision,
    Rejection,
    Tensor,
    decode,
    encode,
)
from services.aggregator.prefetch import DEFAULT_PREFETCH_BYTES, update_prefetch
from services.common.bus.pika_connect import tune_socket_reads
from services.common.logging import configure_logging
from services.common.settings import DEFAULT_AMQP_URL
from services.common.topology import (
    EVENTS_EXCHANGE,
    UPDATES_EXCHANGE,
    QueueType,
    event_key,
    task_topology,
    update_key,
    updates_queue,
)

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("FEDMQ_AMQP_URL", DEFAULT_AMQP_URL)
DELTA_SCALE = 1e-3
"""Deltas are small random numbers, like a few SGD steps: valid under any norm bound."""
STARTUP_TIMEOUT_S = 180.0
"""An aggregator imports torch and builds its model before it consumes (slow on a busy box)."""
POLL_INTERVAL_S = 0.002
"""How often the broker is asked whether the aggregator's consumer is there yet."""


def machine() -> dict[str, object]:
    """Cores and load: the context every number of a noisy shared machine needs."""
    one, five, _ = os.getloadavg()
    return {"cores": os.cpu_count(), "load_average_1m": round(one, 2), "load_5m": round(five, 2)}


def unique_task_id(prefix: str) -> str:
    """A fresh task id, so a run never meets the queues or checkpoints of another."""
    return f"bench-{prefix}-{uuid.uuid4().hex[:10]}"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the `--out` flag every benchmark has (logs go to stderr)."""
    configure_logging(level="WARNING")
    result = argparse.ArgumentParser(description=doc)
    result.add_argument("--out", type=Path, help="also write the JSON report to this file")
    return result


def emit(report: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Print the report as JSON (and write it to `out`); return it for callers and tests."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return report


# -- valid updates ---------------------------------------------------------------------


@cache
def float_entries(model: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Name and shape of every float tensor of a zoo model, as the aggregator lays it out."""
    from services.aggregator.bootstrap import initial_layout_and_weights
    from services.aggregator.task import TaskDefinition

    task = TaskDefinition.model_validate(
        {"spec": {"task_id": "layout", "model": model, "num_classes": 2}}
    )
    layout, _, _ = initial_layout_and_weights(task)
    return tuple((e.name, e.shape) for e in layout.entries if e.is_float)


class UpdateFactory:
    """Encodes valid `ModelUpdate`s for one task: one random delta, a fresh id each time."""

    def __init__(self, task_id: str, model: str, *, precision: Precision = "float32") -> None:
        rng = np.random.default_rng(0)
        wire = None if precision == "float32" else precision
        self.task_id = task_id
        self.delta = tuple(
            Tensor.from_numpy(name, _small_random(rng, shape), precision=wire)
            for name, shape in float_entries(model)
        )

    def update(self, trainer_id: str, *, base_version: int = 0) -> ModelUpdate:
        """A new update (fresh `update_id` and `created_at`) sharing the delta's bytes."""
        return ModelUpdate(
            task_id=self.task_id,
            trainer_id=trainer_id,
            base_version=base_version,
            num_examples=100,
            delta=self.delta,
        )

    def bodies(self, count: int, *, trainers: int = 8) -> list[bytes]:
        """`count` encoded updates from `trainers` identities, base version 0."""
        return [encode(self.update(f"site-{i % trainers}")) for i in range(count)]


def _small_random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, np.float32) * np.float32(DELTA_SCALE)


def update_properties() -> pika.BasicProperties:
    """What a trainer's publish carries: content type, kind, id, schema header, persistent."""
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        type="model_update",
        message_id=uuid.uuid4().hex,
        headers={SCHEMA_HEADER: SCHEMA_VERSION},
        delivery_mode=pika.DeliveryMode.Persistent,
        timestamp=int(time.time()),
    )


# -- broker ----------------------------------------------------------------------------


@contextmanager
def connection(url: str = AMQP_URL) -> Iterator[Any]:
    """A plain pika connection, closed on exit."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()


def declare_task(task_id: str, url: str = AMQP_URL, *, queue_type: QueueType = "classic") -> str:
    """Declare the task's topology exactly as the aggregator will; return its updates queue."""
    from services.common.bus.pika_bus import PikaBus

    with PikaBus(url, connection_name="fedmq-bench") as bus:
        bus.declare(task_topology(task_id, queue_type=queue_type))
    return updates_queue(task_id)


def delete_task_queues(task_id: str, url: str = AMQP_URL) -> None:
    """Remove what a benchmark task left on the broker."""
    with connection(url) as conn:
        channel = conn.channel()
        for name in (updates_queue(task_id), f"fedmq.{task_id}.control"):
            channel.queue_delete(name)
        # The aggregator's watch queue is named after its id and expires by itself.


def preload(
    task_id: str,
    bodies: Sequence[bytes],
    *,
    trainer_ids: Sequence[str] | None = None,
    url: str = AMQP_URL,
) -> None:
    """Publish every body to the task's updates queue with confirms (no consumer yet)."""
    names = trainer_ids or [f"site-{index % 8}" for index in range(len(bodies))]
    with connection(url) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for name, body in zip(names, bodies, strict=True):
            key = update_key(task_id, name)
            channel.basic_publish(UPDATES_EXCHANGE, key, body, update_properties())


def queue_state(channel: Any, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, by passive declare."""
    frame = channel.queue_declare(queue, passive=True)
    return int(frame.method.message_count), int(frame.method.consumer_count)


def bare_drain(queue: str, count: int, *, prefetch: int, url: str = AMQP_URL) -> float:
    """Seconds a bare pika consumer takes to receive and ack `count` messages of `queue`.

    It reads the socket in the same chunks as fedmq's bus, so that the ratio measures the
    aggregator's work rather than a transport setting.
    """
    tune_socket_reads()
    received = 0
    with connection(url) as conn:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=prefetch)

        def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
            nonlocal received
            ch.basic_ack(method.delivery_tag)
            received += 1

        started = time.perf_counter()
        channel.basic_consume(queue, on_message)
        while received < count:
            conn.process_data_events(time_limit=0.05)
        return time.perf_counter() - started


# -- the aggregator under test -----------------------------------------------------------


@dataclass(frozen=True)
class Cadence:
    """How often the aggregator makes its state durable, and how many updates it holds."""

    name: str
    checkpoint_every: int
    checkpoint_interval: float
    prefetch: int | None = None
    """None: the aggregator's own byte-budgeted window (services/aggregator/prefetch.py)."""
    commit_idle_grace: float = 0.0

    def env(self) -> dict[str, str]:
        """The `FEDMQ_*` variables that set this cadence."""
        env = {
            "FEDMQ_CHECKPOINT_EVERY": str(self.checkpoint_every),
            "FEDMQ_CHECKPOINT_INTERVAL": str(self.checkpoint_interval),
            "FEDMQ_COMMIT_IDLE_GRACE": str(self.commit_idle_grace),
        }
        if self.prefetch is not None:
            env["FEDMQ_PREFETCH"] = str(self.prefetch)
        return env

    def window(self, message_bytes: int, buffer_size: int = 1) -> int:
        """Updates the aggregator holds unacked with this cadence (the bare consumer's too)."""
        return update_prefetch(
            explicit=self.prefetch, budget_bytes=DEFAULT_PREFETCH_BYTES,
            message_bytes=message_bytes, buffer_size=buffer_size,
        )  # fmt: skip


DEFAULT_CADENCE = Cadence("default", checkpoint_every=1, checkpoint_interval=2.0)
"""The settings' defaults: a checkpoint for every version unless updates queue up, and
as many updates held as fit in 512 MiB (128 cnn-small, 12 ResNet-18)."""
PRODUCTION_CADENCE = Cadence(
    "production", checkpoint_every=8, checkpoint_interval=1.0, commit_idle_grace=0.05
)
"""For a loaded federation: at most a second or 8 versions not yet durable (a crash
redelivers at most that much) and a commit only after 50 ms without a message."""
CADENCES = {c.name: c for c in (DEFAULT_CADENCE, PRODUCTION_CADENCE)}


class AggregatorProcess:
    """`fedmq aggregator` as a child process on its own checkpoint directory."""

    def __init__(
        self,
        task_id: str,
        *,
        model: str = "cnn-small",
        strategy: str = "fedasync",
        cadence: Cadence = DEFAULT_CADENCE,
        extra_args: Sequence[str] = (),
        workdir: Path,
        urls: Sequence[str] = (AMQP_URL,),
        queue_type: QueueType = "classic",
    ) -> None:
        self.task_id = task_id
        self.log_path = workdir / f"{task_id}.log"
        env = dict(os.environ, FEDMQ_LOG_JSON="true", FEDMQ_AMQP_URL=urls[0], **cadence.env())
        if len(urls) > 1:
            env["FEDMQ_AMQP_URLS"] = ",".join(urls)
        if queue_type != "classic":
            # The queue type is the task file's: the flags below then give way to it.
            task_file = workdir / f"{task_id}.json"
            task_file.write_text(json.dumps(_task_file(task_id, model, strategy, queue_type)))
            extra_args = ["--task-file", str(task_file), *extra_args]
        args = [
            sys.executable, "-m", "services.cli", "aggregator",
            "--task-id", task_id,
            "--checkpoint-dir", str(workdir / "checkpoints"),
            "--model", model,
            "--strategy", strategy,
            *extra_args,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.popen.poll() is None

    def memory(self) -> tuple[int, int]:
        """(resident, peak resident) bytes, from /proc."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def wait_consuming(self, queue: str, url: str = AMQP_URL) -> float:
        """Block until the aggregator consumes `queue`; return that moment (perf_counter)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with connection(url) as conn:
            channel = conn.channel()
            while time.monotonic() < deadline:
                if queue_state(channel, queue)[1] > 0:
                    return time.perf_counter()
                if not self.alive():
                    raise RuntimeError(f"the aggregator exited: see {self.log_path}")
                time.sleep(POLL_INTERVAL_S)
        raise TimeoutError(f"the aggregator did not consume {queue} in {STARTUP_TIMEOUT_S}s")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (it writes a last checkpoint), SIGKILL after `timeout`."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._log.close()
        return code


def _task_file(task_id: str, model: str, strategy: str, queue_type: QueueType) -> dict[str, Any]:
    """The task the flags would make, with another queue type."""
    return {
        "spec": {"task_id": task_id, "model": model, "num_classes": 2},
        "strategy": {"name": strategy},
        "queue_type": queue_type,
    }


@contextmanager
def running_aggregator(
    task_id: str, *, urls: Sequence[str] = (AMQP_URL,), **options: Any
) -> Iterator[AggregatorProcess]:
    """An aggregator on a fresh scratch directory, stopped and its queues deleted on exit."""
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-") as scratch:
        process = AggregatorProcess(task_id, workdir=Path(scratch), urls=urls, **options)
        try:
            yield process
        finally:
            process.stop()
            delete_task_queues(task_id, urls[0])


@dataclass
class EventTap:
    """Collects the `model.published` and `update.rejected` events of one task, timestamped.

    Runs its own connection on a thread so that the benchmark's clock is read as events
    arrive rather than when the main thread gets round to looking.
    """

    task_id: str
    url: str = AMQP_URL
    published: list[tuple[float, ModelPublished]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def __enter__(self) -> EventTap:
        self._thread = threading.Thread(target=self._run, name="bench-event-tap", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the event tap could not subscribe")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def version(self) -> int:
        """The newest published version (what a trainer would train on)."""
        with self._changed:
            return self.published[-1][1].version if self.published else 0

    @property
    def applied(self) -> int:
        """Updates applied according to the newest `model.published` event."""
        with self._changed:
            return self.published[-1][1].updates_applied if self.published else 0

    def wait_applied(self, count: int, *, timeout: float) -> float:
        """Block until `count` updates are applied and durable; return when (perf_counter)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for moment, event in self.published:
                    if event.updates_applied >= count:
                        return moment
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.applied} of {count} updates applied in {timeout}s")
                self._changed.wait(min(left, 0.5))

    def _run(self) -> None:
        with connection(self.url) as conn:
            channel = conn.channel()
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            for event in ("model.published", "update.rejected"):
                key = event_key(event, self.task_id)  # type: ignore[arg-type]
                channel.queue_bind(queue, EVENTS_EXCHANGE, key)
            channel.basic_consume(queue, self._on_event, auto_ack=True)
            self._ready.set()
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.05)

    def _on_event(self, _ch: Any, _method: Any, _properties: Any, body: bytes) -> None:
        moment = time.perf_counter()
        message = decode(body, accept=(ModelPublished, Rejection))
        with self._changed:
            if isinstance(message, ModelPublished):
                self.published.append((moment, message))
            else:
                self.rejected.append(message)
            self._changed.notify_all()
