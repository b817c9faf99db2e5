"""A private 3-node RabbitMQ cluster for the load benchmark, its bare wire rate, its memory.

The cluster is the tests' own (tests/support/private_cluster.py): three nodes on this
machine with their own names, ports and data directories, stopped when the run ends. The
bare rate is what plain pika gets through the same cluster in the same run: publishers
with confirms (as many connections as the load uses, spread over the nodes) into a quorum
queue while one consumer acks, so the queue stays short, like the aggregator's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    MIB,
    UpdateFactory,
    connection,
    declare_task,
    delete_task_queues,
    unique_task_id,
    update_properties,
)
from services.common.bus.pika_connect import tune_socket_reads
from services.common.topology import UPDATES_EXCHANGE, update_key

BARE_SECONDS = 15.0
"""How long the bare publishers run."""
BARE_PREFETCH = 128
"""The bare consumer's window: the aggregator's for cnn-small (docs/operations.md)."""


@contextmanager
def private_cluster() -> Iterator[Any]:
    """Three clustered private nodes (no definitions: guest on `/`), stopped on exit."""
    from tests.support.private_cluster import running_private_cluster

    with running_private_cluster(definitions=None) as cluster:
        yield cluster


def node_memory(cluster: Any) -> list[dict[str, float]]:
    """Resident and peak resident MiB of each node's Erlang VM, from /proc."""
    found = []
    for node in cluster.nodes:
        pid = int(Path(node.pid_file).read_text().strip())
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / MIB
        found.append({"rss_mib": round(fields["VmRSS"], 1), "peak_mib": round(fields["VmHWM"], 1)})
    return found


def bare_rate(urls: Sequence[str], model: str, *, publishers: int) -> dict[str, Any]:
    """Updates/s plain pika publishes (confirmed) and consumes through the cluster at once."""
    task_id = unique_task_id("bare")
    queue = declare_task(task_id, urls[0], queue_type="quorum")
    body = UpdateFactory(task_id, model).bodies(1)[0]
    published, consumed = [0] * publishers, [0]
    stop, done = threading.Event(), threading.Event()

    def publish(index: int) -> None:
        with connection(urls[index % len(urls)]) as conn:
            channel = conn.channel()
            channel.confirm_delivery()
            key = update_key(task_id, f"bare-{index}")
            while not stop.is_set():
                channel.basic_publish(UPDATES_EXCHANGE, key, body, update_properties())
                published[index] += 1

    def consume() -> None:
        tune_socket_reads()
        with connection(urls[0]) as conn:
            channel = conn.channel()
            channel.basic_qos(prefetch_count=BARE_PREFETCH)

            def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
                ch.basic_ack(method.delivery_tag)
                consumed[0] += 1

            channel.basic_consume(queue, on_message)
            while not done.is_set():
                conn.process_data_events(time_limit=0.05)

    threads = [threading.Thread(target=publish, args=(i,), daemon=True) for i in range(publishers)]
    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(BARE_SECONDS)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    received_in_time = consumed[0]
    done.set()
    reader.join()
    delete_task_queues(task_id, urls[0])
    sent = sum(published)
    return {
        "seconds": round(elapsed, 1),
        "publishers": publishers,
        "message_mib": round(len(body) / MIB, 2),
        "published_updates_s": round(sent / elapsed, 1),
        "consumed_updates_s": round(received_in_time / elapsed, 1),
        "wire_limit_updates_s": round(min(sent, received_in_time) / elapsed, 1),
        "wire_limit_mib_s": round(min(sent, received_in_time) * len(body) / MIB / elapsed, 1),
    }
