"""Many simulated trainers against one aggregator: throughput, latency, rejections, memory.

    uv run python -m benchmarks.load [--trainers 200] [--duration 60] [--period 5]
        [--model cnn-small] [--strategy fedasync] [--publishers 4] [--out load.json]
    uv run python -m benchmarks.load --trainers 1,10,50,200 --duration 30
    uv run python -m benchmarks.load --cluster --trainers 1000 --wire-fraction 0.5 --publishers 12

A simulated trainer is an identity, not a process: a few publisher threads (one pika
connection each) multiplex them. Each trainer publishes a valid update every `period`
seconds (jittered) on the newest version it has heard of, like a trainer whose local round
takes that long. Latency is from publish to the `model.published` event whose
`updates_applied` covers the update: one queue and one consumer keep arrival order, so the
k-th update published (by send time) is the k-th applied. The baseline is the offered rate.

`--cluster` starts a private 3-node RabbitMQ cluster on this machine (benchmarks/cluster.py)
for the run: quorum updates queue, the aggregator and the publishers given all three nodes
(publisher connections spread over them), and first the bare publish/consume rate of the
same cluster, the wire limit the offered rate is compared with.
"""

from __future__ import annotations

import bisect
import heapq
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.harness import (
    AMQP_URL,
    CADENCES,
    MIB,
    AggregatorProcess,
    EventTap,
    UpdateFactory,
    connection,
    declare_task,
    emit,
    machine,
    parser,
    running_aggregator,
    unique_task_id,
    update_properties,
)
from schemas import encode
from services.common.topology import UPDATES_EXCHANGE, QueueType, update_key

JITTER = 0.2
"""A trainer's round takes period x U(1 - JITTER, 1 + JITTER): trainers drift apart."""
DRAIN_TIMEOUT_S = 120.0
RSS_SAMPLE_S = 0.5


@dataclass
class Published:
    """Send times of every confirmed update, shared by the publisher threads."""

    times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, moment: float) -> None:
        with self.lock:
            self.times.append(moment)


def publisher(
    factory: UpdateFactory,
    trainers: list[str],
    *,
    period: float,
    until: float,
    tap: EventTap,
    sent: Published,
    seed: int,
    url: str = AMQP_URL,
) -> None:
    """Publish for `trainers` on one connection until `until` (perf_counter)."""
    rng = random.Random(seed)
    now = time.perf_counter()
    due = [(now + rng.uniform(0, period), trainer) for trainer in trainers]
    heapq.heapify(due)
    with connection(url) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        while due:
            moment, trainer = heapq.heappop(due)
            if moment >= until:
                break
            time.sleep(max(0.0, moment - time.perf_counter()))
            body = encode(factory.update(trainer, base_version=tap.version))
            sent_at = time.perf_counter()
            key = update_key(factory.task_id, trainer)
            channel.basic_publish(UPDATES_EXCHANGE, key, body, update_properties())
            sent.add(sent_at)
            pause = period * rng.uniform(1 - JITTER, 1 + JITTER)
            heapq.heappush(due, (max(moment, time.perf_counter()) + pause, trainer))


def latencies(sent: list[float], published: list[tuple[float, int]]) -> np.ndarray:
    """Seconds from each send to the first `model.published` covering it (FIFO order)."""
    counts = [count for _, count in published]
    result = []
    for index, sent_at in enumerate(sorted(sent)):
        position = bisect.bisect_left(counts, index + 1)
        if position < len(published):
            result.append(published[position][0] - sent_at)
    return np.array(result)


def rss_slope(samples: list[tuple[int, int]]) -> float:
    """Bytes of RSS per applied update over the second half of the run (warm-up excluded)."""
    tail = samples[len(samples) // 2 :]
    applied = np.array([a for a, _ in tail], float)
    if len(tail) < 3 or np.ptp(applied) == 0:
        return 0.0
    return float(np.polyfit(applied, np.array([r for _, r in tail], float), 1)[0])


def sample_memory(agg: AggregatorProcess, tap: EventTap, stop: threading.Event) -> list[Any]:
    """(updates applied, RSS) every `RSS_SAMPLE_S` until `stop`, on the caller's thread."""
    samples = []
    while not stop.wait(RSS_SAMPLE_S):
        samples.append((tap.applied, agg.memory()[0]))
    return samples


def run_load(
    trainers: int, *, duration: float, period: float, model: str, strategy: str,
    publishers: int, cadence: str, urls: Sequence[str] = (AMQP_URL,),
    queue_type: QueueType = "classic",
) -> dict[str, Any]:  # fmt: skip
    """One aggregator, `trainers` identities publishing for `duration` seconds."""
    task_id = unique_task_id("load")
    factory = UpdateFactory(task_id, model)
    queue = declare_task(task_id, urls[0], queue_type=queue_type)
    sent = Published()
    options = {
        "model": model, "strategy": strategy, "cadence": CADENCES[cadence],
        "urls": urls, "queue_type": queue_type,
    }  # fmt: skip
    with (
        EventTap(task_id, url=urls[0]) as tap,
        running_aggregator(task_id, **options) as agg,
    ):
        agg.wait_consuming(queue, urls[0])
        rss_start = agg.memory()[0]
        started = time.perf_counter()
        until = started + duration
        names = [f"sim-{i:04d}" for i in range(trainers)]
        threads = [
            threading.Thread(
                target=publisher,
                args=(factory, names[p::publishers]),
                kwargs={
                    "period": period,
                    "until": until,
                    "tap": tap,
                    "sent": sent,
                    "seed": p,
                    "url": urls[p % len(urls)],
                },
                daemon=True,
            )
            for p in range(min(publishers, trainers))
        ]
        stop = threading.Event()
        memory: list[Any] = []
        sampler = threading.Thread(
            target=lambda: memory.extend(sample_memory(agg, tap, stop)), daemon=True
        )
        for thread in (*threads, sampler):
            thread.start()
        for thread in threads:
            thread.join()
        tap.wait_applied(len(sent.times), timeout=DRAIN_TIMEOUT_S)
        stop.set()
        sampler.join()
        rss_end, peak = agg.memory()
    events = [(moment, event.updates_applied) for moment, event in tap.published]
    seconds = latencies(sent.times, events)
    message_mib = len(encode(factory.update("x"))) / MIB
    last = events[-1][0]
    return {
        "trainers": trainers,
        "duration_s": duration,
        "period_s": period,
        "published": len(sent.times),
        "offered_updates_s": round(len(sent.times) / duration, 2),
        "applied": events[-1][1],
        "applied_updates_s": round(events[-1][1] / (last - started), 2),
        "applied_mib_s": round(events[-1][1] * message_mib / (last - started), 1),
        "versions": len(events) - 1,
        "latency_p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 1),
        "latency_p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 1),
        "latency_max_ms": round(float(seconds.max()) * 1000, 1),
        "rejected": len(tap.rejected),
        "rss_start_mib": round(rss_start / MIB, 1),
        "rss_end_mib": round(rss_end / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "rss_slope_bytes_per_update": round(rss_slope(memory), 1),
        "all_applied": events[-1][1] == len(sent.times),
        "p99_under_1s": bool(np.percentile(seconds, 99) < 1.0),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args_parser = parser(__doc__)
    args_parser.add_argument("--trainers", default="200", help="comma-separated counts")
    args_parser.add_argument("--duration", type=float, default=60.0)
    args_parser.add_argument("--period", type=float, default=5.0, help="seconds per local round")
    args_parser.add_argument("--model", default="cnn-small")
    args_parser.add_argument("--strategy", default="fedasync")
    args_parser.add_argument("--publishers", type=int, default=4)
    args_parser.add_argument("--cadence", default="default", choices=sorted(CADENCES))
    args_parser.add_argument(
        "--cluster", action="store_true", help="run on a private 3-node cluster (quorum queue)"
    )
    args_parser.add_argument(
        "--wire-fraction",
        type=float,
        help="with --cluster: choose the period so that the offered rate is this fraction of "
        "the wire limit measured first (overrides --period)",
    )
    args = args_parser.parse_args(argv)
    started = machine()
    options = {
        "duration": args.duration,
        "period": args.period,
        "model": args.model,
        "strategy": args.strategy,
        "publishers": args.publishers,
        "cadence": args.cadence,
    }
    report: dict[str, Any] = {
        "benchmark": "load",
        "machine_at_start": started,
        "model": args.model,
        "strategy": args.strategy,
        "cadence": vars(CADENCES[args.cadence]),
    }
    counts = [int(count) for count in args.trainers.split(",")]
    if args.cluster:
        report.update(run_on_cluster(counts, options, wire_fraction=args.wire_fraction))
    else:
        report["results"] = [run_load(count, **options) for count in counts]
    report["machine_at_end"] = machine()
    return emit(report, args.out)


def run_on_cluster(
    counts: list[int], options: dict[str, Any], *, wire_fraction: float | None
) -> dict[str, Any]:
    """The bare wire rate, then each load, on one private 3-node cluster started for the run."""
    from benchmarks.cluster import bare_rate, node_memory, private_cluster

    with private_cluster() as cluster:
        urls = cluster.urls()
        bare = bare_rate(urls, options["model"], publishers=options["publishers"])
        bare["node_memory_after"] = node_memory(cluster)
        results = []
        for count in counts:
            if wire_fraction is not None:
                rate = wire_fraction * bare["wire_limit_updates_s"]
                options = {**options, "period": round(count / rate, 2)}
            result = run_load(count, **options, urls=urls, queue_type="quorum")
            result["node_memory_end"] = node_memory(cluster)
            result["offered_fraction_of_wire_limit"] = round(
                result["offered_updates_s"] / bare["wire_limit_updates_s"], 2
            )
            results.append(result)
    return {"cluster": {"nodes": len(urls), "queue_type": "quorum"}, "bare": bare,
            "results": results}  # fmt: skip


if __name__ == "__main__":
    main()
