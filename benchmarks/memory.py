"""Aggregator memory: O(model size x buffer), independent of trainers and of updates.

    uv run python -m benchmarks.memory [--models cnn-small,resnet18] [--buffers 1,4,8]
        [--trainers 1,50,200] [--updates 400] [--out memory.json]

Part 1, RSS vs (model size, FedBuff K): a fresh `fedmq aggregator` per case drains
max(8, 2K) preloaded updates; its peak RSS above its RSS at start-up is fitted as
`extra = model_bytes x (a + b x K)`. Part 2, RSS vs (trainers, updates): cnn-small,
FedBuff K=4, updates from 1 to 200 distinct trainers fed in chunks; RSS is read after
each chunk and fitted against updates applied (bytes/update) and trainers (bytes/trainer).
The baseline is the aggregator's own RSS before its first update.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    MIB,
    AggregatorProcess,
    Cadence,
    EventTap,
    UpdateFactory,
    declare_task,
    delete_task_queues,
    emit,
    float_entries,
    machine,
    parser,
    preload,
    unique_task_id,
)
from schemas import encode

DRAIN_TIMEOUT_S = 600.0
MEMORY_CADENCE = Cadence("memory", checkpoint_every=1, checkpoint_interval=2.0, prefetch=16)
"""A fixed window of 16 updates (2K when larger), so the fit isolates model size x K; the
default window is a byte budget (512 MiB), which bounds it independently of K."""
CHUNKS = 4
TRAINERS_BUFFER = 4
"""FedBuff K of part 2; chunks are whole buffers, so every chunk ends in a durable version."""


def model_bytes(model: str) -> int:
    """Bytes of the flat float32 vector of a model."""
    return 4 * sum(int(np.prod(shape)) for _, shape in float_entries(model))


def buffer_case(model: str, buffer_size: int, workdir: Path) -> dict[str, Any]:
    """Peak RSS of an aggregator that drains 2K updates (at least 8) with FedBuff K."""
    count = max(8, 2 * buffer_size)
    task_id = unique_task_id("mem")
    queue = declare_task(task_id)
    args = ["--buffer-size", str(buffer_size)]
    agg = AggregatorProcess(
        task_id, model=model, strategy="fedbuff", extra_args=args, workdir=workdir,
        cadence=MEMORY_CADENCE,
    )  # fmt: skip
    try:
        with EventTap(task_id) as tap:
            agg.wait_consuming(queue)
            base = agg.memory()[0]
            preload(task_id, UpdateFactory(task_id, model).bodies(count))
            tap.wait_applied(count, timeout=DRAIN_TIMEOUT_S)
            peak = agg.memory()[1]
    finally:
        agg.stop()
        delete_task_queues(task_id)
    return {
        "model": model,
        "model_mib": round(model_bytes(model) / MIB, 2),
        "buffer_size": buffer_size,
        "prefetch": MEMORY_CADENCE.window(model_bytes(model), buffer_size),
        "updates": count,
        "rss_start_mib": round(base / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "extra_mib": round((peak - base) / MIB, 1),
        "extra_in_models": round((peak - base) / model_bytes(model), 2),
    }


def fit_model_buffer(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Least squares `extra = model x (a + b K)`: a and b in model sizes."""
    size = np.array([r["model_mib"] for r in rows])
    k = np.array([r["buffer_size"] for r in rows], float)
    extra = np.array([r["extra_mib"] for r in rows])
    (a, b), *_ = np.linalg.lstsq(np.column_stack([size, size * k]), extra, rcond=None)
    predicted = size * (a + b * k)
    return {
        "a_models": round(float(a), 2),
        "b_models_per_buffered_update": round(float(b), 2),
        "max_residual_mib": round(float(np.abs(predicted - extra).max()), 1),
    }


def trainers_case(trainers: int, updates: int, workdir: Path) -> dict[str, Any]:
    """RSS after each chunk of updates from `trainers` identities (cnn-small, K=4)."""
    task_id = unique_task_id("memt")
    queue = declare_task(task_id)
    factory = UpdateFactory(task_id, "cnn-small")
    # Each site counts once per aggregate, so a buffer never waits for more sites than exist.
    buffer_size = min(TRAINERS_BUFFER, trainers)
    args = ["--buffer-size", str(buffer_size)]
    agg = AggregatorProcess(
        task_id, strategy="fedbuff", extra_args=args, workdir=workdir, cadence=MEMORY_CADENCE
    )
    chunk = max(1, updates // CHUNKS // buffer_size) * buffer_size
    samples = []
    try:
        with EventTap(task_id) as tap:
            agg.wait_consuming(queue)
            samples.append((0, agg.memory()[0]))
            for index in range(CHUNKS):
                names = [f"sim-{(index * chunk + i) % trainers:04d}" for i in range(chunk)]
                preload(task_id, [encode(factory.update(n)) for n in names], trainer_ids=names)
                tap.wait_applied((index + 1) * chunk, timeout=DRAIN_TIMEOUT_S)
                samples.append(((index + 1) * chunk, agg.memory()[0]))
            rejected = len(tap.rejected)
    finally:
        agg.stop()
        delete_task_queues(task_id)
    applied = np.array([a for a, _ in samples[1:]], float)
    rss = np.array([r for _, r in samples[1:]], float)
    slope = float(np.polyfit(applied, rss, 1)[0])  # first chunk onwards: warm-up excluded
    return {
        "trainers": trainers,
        "updates": updates,
        "rejected": rejected,
        "rss_mib_by_updates": {a: round(r / MIB, 1) for a, r in samples},
        "slope_bytes_per_update": round(slope, 1),
        "rss_end_mib": round(samples[-1][1] / MIB, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args_parser = parser(__doc__)
    args_parser.add_argument("--models", default="cnn-small,resnet18")
    args_parser.add_argument("--buffers", default="1,4,8")
    args_parser.add_argument("--trainers", default="1,50,200")
    args_parser.add_argument("--updates", type=int, default=400)
    args = args_parser.parse_args(argv)
    started = machine()
    with tempfile.TemporaryDirectory(prefix="fedmq-mem-") as scratch:
        workdir = Path(scratch)
        by_buffer = [
            buffer_case(model, int(k), workdir)
            for model in filter(None, args.models.split(","))  # "" skips part 1
            for k in args.buffers.split(",")
        ]
        by_trainers = [
            trainers_case(int(n), args.updates, workdir) for n in args.trainers.split(",")
        ]
    counts = np.array([r["trainers"] for r in by_trainers], float)
    ends = np.array([r["rss_end_mib"] for r in by_trainers]) * MIB
    per_trainer = float(np.polyfit(counts, ends, 1)[0]) if len(counts) > 1 else 0.0
    report = {
        "benchmark": "memory",
        "machine_at_start": started,
        "machine_at_end": machine(),
        "by_model_and_buffer": by_buffer,
        "fit_model_and_buffer": fit_model_buffer(by_buffer) if by_buffer else None,
        "by_trainers_and_updates": by_trainers,
        "slope_bytes_per_trainer": round(per_trainer, 1),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
