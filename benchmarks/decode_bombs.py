"""Memory and time of decoding hostile bodies: msgpack's defaults against fedmq's bounds.

    uv run python -m benchmarks.decode_bombs

Each body is decoded in a fresh child process (so that peak RSS is its own). The baseline
measured in the same run is `msgpack.unpackb` with its default limits, what the aggregator
did before its bounds; the bounded decode uses the limits of `cnn-small` updates
(`DecodeLimits.for_model`). Prints JSON: per bomb, body size, peak RSS growth and seconds.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import msgpack

from schemas import DecodeError, DecodeLimits, ModelUpdate, decode

MIB = 1024 * 1024
CNN_SMALL = DecodeLimits.for_model(tensors=34, float_elements=419_618)
"""The decode bounds of a `cnn-small` task (34 float tensors, 419,618 floats)."""


def bomb(name: str) -> bytes:
    """The hostile bodies of the adversarial suite."""
    if name == "16MiB-empty-maps":
        return b"\xdd" + (16 * MIB).to_bytes(4, "big") + b"\x80" * (16 * MIB)
    if name == "nested-3MB":
        leaf = b"\x9c" + b"\x80" * 12
        level3 = b"\xdc\x00\x40" + leaf * 64
        level2 = b"\xdc\x00\x40" + level3 * 64
        return b"\xdc\x00\x40" + level2 * 64
    if name == "400k-unknown-keys":
        keys = (f"k{i:05d}".encode() for i in range(400_000))
        body = b"".join(b"\xa6" + key + b"\xc0" for key in keys)
        return b"\xdf" + (400_000).to_bytes(4, "big") + body
    raise ValueError(f"unknown bomb {name!r}")


BOMBS = ("16MiB-empty-maps", "nested-3MB", "400k-unknown-keys")


def measure(name: str, mode: str) -> dict[str, object]:
    """Decode one bomb here; peak RSS growth and time."""
    body = bomb(name)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    outcome = "decoded"
    try:
        if mode == "msgpack-default":
            fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
            if isinstance(fields, dict):
                ModelUpdate.model_validate(fields)
        else:
            decode(body, accept=(ModelUpdate,), limits=CNN_SMALL)
    except DecodeError as error:
        outcome = error.reason.value
    except Exception as error:  # what the validation raised before the bounds existed
        outcome = type(error).__name__
    seconds = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"bytes": len(body), "rss_growth_mib": round(grown / MIB, 1),
            "seconds": round(seconds, 3), "outcome": outcome}  # fmt: skip


def main() -> int:
    """Run every bomb in both modes, each in its own process; print JSON."""
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], sys.argv[2])))
        return 0
    results: dict[str, dict[str, object]] = {}
    for name in BOMBS:
        results[name] = {}
        for mode in ("msgpack-default", "bounded"):
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.decode_bombs", name, mode],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[name][mode] = json.loads(child.stdout)
    print(json.dumps({"limits": CNN_SMALL.__dict__, "bombs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
