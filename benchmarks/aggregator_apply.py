"""In-process aggregator cost per update: decode + validate + apply (+ checkpoint), no broker.

    uv run python -m benchmarks.aggregator_apply [--updates 30] [--quick]

The baseline measured in the same run is decoding alone: the ratio says how much the
aggregator's own work costs on top of reading the bytes. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from schemas import ModelUpdate, TaskSpec, Tensor, decode, encode
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.core import AggregatorCore
from services.aggregator.guard import GuardSettings
from services.aggregator.layout import ParamLayout
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.task import TaskDefinition
from services.common.memory import reuse_freed_memory

MIB = 1024 * 1024
MODEL_SIZES = {"cnn-small": 419_618, "resnet18": 11_172_000}


def _bodies(size: int, count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        encode(
            ModelUpdate(
                task_id="bench",
                trainer_id=f"site-{i % 8}",
                base_version=0,
                num_examples=100,
                delta=(Tensor.from_numpy("w", rng.standard_normal(size, np.float32) * 1e-3),),
            )
        )
        for i in range(count)
    ]


def _core(size: int, strategy: str) -> AggregatorCore:
    task = TaskDefinition(
        spec=TaskSpec(task_id="bench", model="bench", num_classes=2),
        strategy=StrategyConfig(name=strategy, staleness="polynomial", buffer_size=4),  # type: ignore[arg-type]
        # The model starts at zero: no relative bound, every other guard measured as shipped.
        guard=GuardSettings(max_relative_change=None),
    )
    layout = ParamLayout.from_entries([("w", "float32", (size,))])
    return AggregatorCore(
        task=task,
        layout=layout,
        weights=np.zeros(size, np.float32),
        integers={},
        strategy=build_strategy(task.strategy),
    )


def measure(model: str, strategy: str, count: int, directory: Path) -> dict[str, object]:
    """Updates/s for decode-only and for the aggregator's full per-update work."""
    size = MODEL_SIZES[model]
    bodies = _bodies(size, count)
    started = time.perf_counter()
    for body in bodies:
        decode(body, accept=(ModelUpdate,))
    decode_s = time.perf_counter() - started
    core = _core(size, strategy)
    store = CheckpointStore(directory / f"{model}-{strategy}")
    started = time.perf_counter()
    for body in bodies:
        outcome = core.submit(decode(body, accept=(ModelUpdate,)), redelivered=False, now=0.0)
        if outcome.step is not None:
            store.save(core.checkpoint())  # checkpoint every version, the default cadence
    full_s = time.perf_counter() - started
    mib = sum(len(b) for b in bodies) / MIB
    return {
        "model": model,
        "strategy": strategy,
        "update_mib": round(mib / count, 2),
        "decode_only_updates_s": round(count / decode_s, 1),
        "aggregator_updates_s": round(count / full_s, 1),
        "aggregator_mib_s": round(mib / full_s, 1),
        "aggregator_vs_decode_only": round(decode_s / full_s, 3),
        "versions": core.version,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=24)
    parser.add_argument("--quick", action="store_true", help="tiny model, for smoke tests")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    models = ["cnn-small"] if args.quick else list(MODEL_SIZES)
    count = 4 if args.quick else args.updates
    with tempfile.TemporaryDirectory() as scratch:
        results = [
            measure(model, strategy, count, Path(scratch))
            for model in models
            for strategy in ("fedasync", "fedbuff")
        ]
    report = {
        "benchmark": "aggregator_apply",
        "cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
