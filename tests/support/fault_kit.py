"""Real fedmq processes on a private broker, and the evidence fault tests read back from them.

A `FaultFederation` starts the aggregator, trainers and evaluators of one task as child
processes pointed at one (private) broker, keeps every process it started so that a
finalizer can take them all down, and reads what they leave behind: the aggregator's
checkpoints, the update ids trainers logged as confirmed, process RSS and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pika
import pika.exceptions

from services.aggregator.checkpoint import Checkpoint, CheckpointStore
from services.common.bus.pika_bus import PikaBus
from services.common.bus.pika_connect import ReconnectPolicy
from services.common.topology import DEAD_QUEUE, DETAIL_HEADER, REASON_HEADER
from tests.support.private_broker import free_port
from tests.support.processes import ServiceProcess, wait_for

FAST_RECONNECT: Final = ReconnectPolicy(initial_delay_s=0.2, max_delay_s=1.0, max_attempts=300)
"""The test's own clients ride out broker restarts without production back-off delays."""
STOP_TIMEOUT_S: Final = 20.0
"""How long a child may take to leave after SIGTERM before it is killed."""
START_TIMEOUT_S: Final = 120.0
"""A fresh process imports torch: on a busy 2-core machine that alone can take 20 s."""


@dataclass
class FaultFederation:
    """One task's processes on one broker; `close()` (a fixture finalizer) ends them all."""

    amqp_url: str
    run_dir: Path
    data_dir: Path
    task_id: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:8]}")
    processes: list[ServiceProcess] = field(default_factory=list)
    _serial: int = 0

    @property
    def checkpoint_root(self) -> Path:
        """Directory given to the aggregator as `--checkpoint-dir`."""
        return self.run_dir / "checkpoints"

    def env(self, **extra: str) -> dict[str, str]:
        """The `FEDMQ_*` environment every child gets, plus `extra`."""
        return {
            "FEDMQ_AMQP_URL": self.amqp_url,
            "FEDMQ_TASK_ID": self.task_id,
            "FEDMQ_DATA_DIR": str(self.data_dir),
            "FEDMQ_LOG_JSON": "true",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def spawn(self, name: str, args: list[str], **env: str) -> ServiceProcess:
        """Start `fedmq ARGS` with its log in `run_dir/logs/<name>-<n>.log`."""
        self._serial += 1
        log_path = self.run_dir / "logs" / f"{name}-{self._serial}.log"
        process = ServiceProcess(args, log_path=log_path, env=self.env(**env))
        self.processes.append(process)
        return process

    def aggregator(self, *flags: str, **env: str) -> ServiceProcess:
        """`fedmq aggregator` for this task, checkpoints under `checkpoint_root`."""
        args = ["aggregator", "--checkpoint-dir", str(self.checkpoint_root), *flags]
        return self.spawn("aggregator", args, **env)

    def trainer(
        self, trainer_id: str, *, site: int, sites: int, max_updates: int | None = None, **env: str
    ) -> ServiceProcess:
        """`fedmq trainer` on part `site` of `sites` of PneumoniaMNIST's training split."""
        args = ["trainer", "--trainer-id", trainer_id, "--site-index", str(site)]
        args += ["--num-sites", str(sites), "--seed", str(site)]
        if max_updates is not None:
            args += ["--max-updates", str(max_updates)]
        return self.spawn(trainer_id, args, **env)

    def evaluator(self, log_path: Path, **env: str) -> ServiceProcess:
        """`fedmq evaluator` appending its reports to `log_path`."""
        args = ["evaluator", "--log-path", str(log_path), "--checkpoint-dir"]
        return self.spawn("evaluator", [*args, str(self.checkpoint_root)], **env)

    def bus(self) -> PikaBus:
        """A test-side bus on the same broker that rides out restarts quickly."""
        return PikaBus(self.amqp_url, reconnect=FAST_RECONNECT, connection_name="fedmq-faults")

    def checkpoint(self) -> Checkpoint | None:
        """The aggregator's newest readable checkpoint."""
        directory = self.checkpoint_root / self.task_id
        if not directory.exists():
            return None
        return CheckpointStore(directory).latest()

    def close(self) -> None:
        """Wake stopped children, SIGTERM every live one, SIGKILL what does not leave."""
        for process in self.processes:
            if process.alive():
                resume(process)
        for process in self.processes:
            if process.alive():
                process.terminate(timeout=STOP_TIMEOUT_S)


def resume(process: ServiceProcess) -> None:
    """SIGCONT (a no-op for a process that was not stopped)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)


def suspend(process: ServiceProcess) -> None:
    """SIGSTOP: the process hangs (no heartbeats, no acks) without its connections closing."""
    os.kill(process.pid, signal.SIGSTOP)


def log_events(process: ServiceProcess, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of `process` whose `event` is `event`."""
    found = []
    for line in process.output().splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by SIGKILL
        if record.get("event") == event:
            found.append(record)
    return found


def logged(process: ServiceProcess, event: str) -> int:
    """How many times `process` logged `event`."""
    return len(log_events(process, event))


def confirmed_update_ids(process: ServiceProcess) -> list[str]:
    """Update ids a trainer logged as confirmed by the broker (`update sent`)."""
    return [record["update_id"] for record in log_events(process, "update sent")]


def wait_serving(
    process: ServiceProcess, *, count: int = 1, timeout: float = START_TIMEOUT_S
) -> None:
    """Wait until the aggregator logged `aggregator_serving` `count` times (its log is appended)."""
    wait_for(
        lambda: logged(process, "aggregator_serving") >= count or not process.alive(),
        timeout=timeout,
        what="the aggregator to serve",
    )
    assert process.alive(), process.output()[-3000:]


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def scrape(port: int, metric: str) -> dict[str, float]:
    """Samples of `metric` on a Prometheus endpoint: `{label text: value}` ('' if unlabelled)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric) and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            labels = name[len(metric) :]
            if labels and not labels.startswith("{"):
                continue  # another metric sharing the prefix
            samples[labels] = float(value)
    return samples


def metrics_port() -> int:
    """A free port for a child's Prometheus endpoint."""
    return free_port()


def finite(weights: np.ndarray) -> bool:
    """Whether every weight is finite (no NaN, no Inf)."""
    return bool(np.isfinite(weights).all())


@dataclass(frozen=True)
class DeadLetterRecord:
    """One message of `fedmq.dead`: its id, reason header and original routing key."""

    message_id: str | None
    reason: str
    detail: str
    routing_key: str


def drain_dead_letters(amqp_url: str) -> list[DeadLetterRecord]:
    """Take every message out of `fedmq.dead` (a private broker's: nobody else reads it)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    records: list[DeadLetterRecord] = []
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        for method, properties, _body in _consume_all(channel, DEAD_QUEUE):
            headers = properties.headers or {}
            records.append(
                DeadLetterRecord(
                    message_id=properties.message_id,
                    reason=_text(headers.get(REASON_HEADER, "")),
                    detail=_text(headers.get(DETAIL_HEADER, "")),
                    routing_key=method.routing_key,
                )
            )
            channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()
    return records


def _consume_all(channel: Any, queue: str) -> Iterator[tuple[Any, Any, bytes]]:
    for method, properties, body in channel.consume(queue, inactivity_timeout=1.0):
        if method is None:
            break
        yield method, properties, body
    channel.cancel()


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class EventTap:
    """Collects every message of one task on `fedmq.events` on a thread of its own.

    Events are read with bare pika on a queue bound before the test acts, so nothing the
    services emit is missed; it reconnects and re-binds after a broker restart.
    """

    def __init__(self, amqp_url: str, task_id: str) -> None:
        self.amqp_url = amqp_url
        self.task_id = task_id
        self.queue = f"test.events.{uuid.uuid4().hex[:10]}"
        self.events: list[tuple[str, dict[str, Any]]] = []
        """(routing key, decoded body) in arrival order."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-tap", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the event tap could not bind its queue")

    def of(self, kind: str) -> list[dict[str, Any]]:
        """Bodies of the events whose routing key starts with `kind`."""
        with self._lock:
            return [body for key, body in self.events if key.startswith(kind)]

    def close(self) -> None:
        """Stop the reader thread."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import msgpack

        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            except pika.exceptions.AMQPError:
                time.sleep(0.3)
                continue
            try:
                channel = connection.channel()
                channel.exchange_declare("fedmq.events", "topic", durable=True)
                # durable so that events published while a broker restarts are kept
                channel.queue_declare(self.queue, durable=True, arguments={"x-expires": 600_000})
                channel.queue_bind(self.queue, "fedmq.events", f"*.{self.task_id}")
                channel.queue_bind(self.queue, "fedmq.events", f"*.*.{self.task_id}")
                channel.queue_bind(self.queue, "fedmq.events", f"heartbeat.{self.task_id}.*")
                channel.queue_bind(self.queue, "fedmq.events", f"trainer.left.{self.task_id}.*")
                self._ready.set()
                for method, _props, body in channel.consume(self.queue, inactivity_timeout=0.2):
                    if self._stop.is_set():
                        break
                    if method is None:
                        continue
                    decoded = msgpack.unpackb(body, raw=False)
                    with self._lock:
                        self.events.append((method.routing_key, decoded))
                    channel.basic_ack(method.delivery_tag)
                if connection.is_open:
                    channel.queue_delete(self.queue)
                    connection.close()
            except pika.exceptions.AMQPError:
                time.sleep(0.3)
