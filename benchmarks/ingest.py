"""Ingest rate of a real aggregator process against a bare pika consumer, through the broker.

    uv run python -m benchmarks.ingest [--models cnn-small,resnet18] [--updates 480]
        [--resnet-updates 20] [--strategies fedasync,fedbuff] [--cadences default,production]
        [--out ingest.json]

For each case the same pre-encoded valid updates are published into an idle queue first
(no consumer yet), then drained: once by a consumer that only receives and acks (the
baseline, on an identical queue), once by `fedmq aggregator` on a fresh task, which decodes,
validates, applies, checkpoints at its cadence and publishes models. The aggregator's drain
runs from the moment its consumer appears on the queue to the `model.published` event that
covers the last update (so it includes making that update durable). Prints JSON.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.harness import (
    CADENCES,
    MIB,
    Cadence,
    EventTap,
    UpdateFactory,
    bare_drain,
    declare_task,
    delete_task_queues,
    emit,
    machine,
    parser,
    preload,
    running_aggregator,
    unique_task_id,
)
from schemas import Precision

TARGET_FRACTION = 0.8
"""The aggregator should sustain at least 80% of the bare consume rate."""
DRAIN_TIMEOUT_S = 600.0


def baseline(bodies: list[bytes], prefetch: int) -> float:
    """Seconds a bare consumer takes to drain the bodies from a fresh, identical queue."""
    task_id = unique_task_id("bare")
    queue = declare_task(task_id)
    try:
        preload(task_id, bodies)
        return bare_drain(queue, len(bodies), prefetch=prefetch)
    finally:
        delete_task_queues(task_id)


def aggregator_drain(
    model: str, strategy: str, cadence: Cadence, count: int, *, precision: Precision = "float32"
) -> tuple[float, dict[str, Any]]:
    """Seconds the aggregator takes to apply `count` preloaded updates durably, and details."""
    task_id = unique_task_id("ingest")
    bodies = UpdateFactory(task_id, model, precision=precision).bodies(count)
    queue = declare_task(task_id)
    preload(task_id, bodies)
    with (
        EventTap(task_id) as tap,
        running_aggregator(task_id, model=model, strategy=strategy, cadence=cadence) as agg,
    ):
        started = agg.wait_consuming(queue)
        finished = tap.wait_applied(count, timeout=DRAIN_TIMEOUT_S)
        peak = agg.memory()[1]
    details = {
        "commits": len(tap.published) - 1,  # the first model.published is the start-up one
        "rejected": len(tap.rejected),
        "peak_rss_mib": round(peak / MIB, 1),
        "message_mib": round(len(bodies[0]) / MIB, 2),
    }
    return finished - started, details


def measure(model: str, strategy: str, cadence: Cadence, count: int) -> dict[str, Any]:
    """One case: the aggregator's drain next to a bare drain of the same bytes, just before."""
    bodies = UpdateFactory("bench-bare", model).bodies(count)
    bare_s = baseline(bodies, prefetch=cadence.window(len(bodies[0])))
    del bodies
    agg_s, details = aggregator_drain(model, strategy, cadence, count)
    mib = details["message_mib"] * count
    fraction = bare_s / agg_s
    return {
        "model": model,
        "strategy": strategy,
        "cadence": cadence.name,
        "updates": count,
        "bare_updates_s": round(count / bare_s, 1),
        "bare_mib_s": round(mib / bare_s, 1),
        "aggregator_updates_s": round(count / agg_s, 1),
        "aggregator_mib_s": round(mib / agg_s, 1),
        "fraction_of_bare": round(fraction, 3),
        "meets_target": fraction >= TARGET_FRACTION,
        **details,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args_parser = parser(__doc__)
    args_parser.add_argument("--models", default="cnn-small,resnet18")
    args_parser.add_argument("--updates", type=int, default=480, help="per cnn-small case")
    args_parser.add_argument("--resnet-updates", type=int, default=20, help="per resnet18 case")
    args_parser.add_argument("--strategies", default="fedasync,fedbuff")
    args_parser.add_argument("--cadences", default="default,production")
    args = args_parser.parse_args(argv)
    started = machine()
    results = []
    for model in args.models.split(","):
        count = args.resnet_updates if model == "resnet18" else args.updates
        for strategy in args.strategies.split(","):
            for cadence in args.cadences.split(","):
                results.append(measure(model, strategy, CADENCES[cadence], count))
    report = {
        "benchmark": "ingest",
        "machine_at_start": started,
        "machine_at_end": machine(),
        "target_fraction_of_bare": TARGET_FRACTION,
        "cadences": {name: vars(c) for name, c in CADENCES.items()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": results,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
