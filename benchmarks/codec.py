"""Codec throughput: encode/decode MiB/s of model updates next to a memcpy of the same bytes.

    uv run python -m benchmarks.codec [--repeats 7] [--quick]

Prints one JSON document. Ratios against memcpy measured in the same run make the numbers
comparable across noisy machines; the absolute target is 1 GiB/s on the 45 MiB update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from schemas import ModelUpdate, Tensor, decode, encode
from services.common.memory import reuse_freed_memory

MIB = 1024 * 1024
SIZES = {
    # ResNet-18 (11.2 M float32 parameters) and the small CNN (about 0.43 M).
    "resnet18": [64 * 3 * 3 * 3, 11_170_000, 512, 1024],
    "cnn-small": [32 * 9, 64 * 32 * 9, 128 * 64 * 9, 128 * 64 * 2 * 2 * 4, 430_000 - 166_208],
}


def _update(sizes: list[int], rng: np.random.Generator) -> ModelUpdate:
    tensors = tuple(
        Tensor.from_numpy(f"layer{i}.weight", rng.standard_normal(n, dtype=np.float32))
        for i, n in enumerate(sizes)
    )
    return ModelUpdate(
        task_id="bench", trainer_id="site-0", base_version=0, num_examples=100, delta=tensors
    )


def _best_seconds(action: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def measure(name: str, sizes: list[int], repeats: int) -> dict[str, float | str]:
    """Encode, decode and memcpy rates for one update size."""
    update = _update(sizes, np.random.default_rng(0))
    body = encode(update)
    payload = np.frombuffer(body, dtype=np.uint8)
    target = np.empty_like(payload)
    mib = len(body) / MIB
    encode_s = _best_seconds(lambda: encode(update), repeats)
    decode_s = _best_seconds(lambda: decode(body, accept=(ModelUpdate,)), repeats)
    memcpy_s = _best_seconds(lambda: np.copyto(target, payload), repeats)
    return {
        "update": name,
        "message_mib": round(mib, 2),
        "encode_mib_s": round(mib / encode_s, 1),
        "decode_mib_s": round(mib / decode_s, 1),
        "memcpy_mib_s": round(mib / memcpy_s, 1),
        "encode_vs_memcpy": round(memcpy_s / encode_s, 3),
        "decode_vs_memcpy": round(memcpy_s / decode_s, 3),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    args = parser.parse_args(argv)
    sizes = {"small": [1000, 2000]} if args.quick else SIZES
    default_malloc = [measure(name, shape, args.repeats) for name, shape in sizes.items()]
    tuned = reuse_freed_memory()  # what every fedmq service does at start-up
    results = [measure(name, shape, args.repeats) for name, shape in sizes.items()]
    report = {
        "benchmark": "codec",
        "machine": {
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "target_gib_s_on_resnet18": 1.0,
        "malloc_tuned": tuned,
        "results": results,
        "results_with_default_malloc": default_malloc,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
