"""Atomic on-disk checkpoints of the aggregator: weights, version, strategy state, applied ids.

A checkpoint is one `checkpoint-<version>.ckpt` file: a JSON manifest (metadata plus the
dtype, shape, offset and CRC-32 of every array) followed by the raw array bytes. No pickle,
no zip: writing is one pass over the weights (the CRC) and one `write`, which matters when
the aggregator checkpoints a 45 MiB model for every version. It is written to a temporary
name, fsynced, renamed and the directory fsynced, so a crash leaves the old or the new one.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from services.aggregator.strategies.base import StateDict

_log = structlog.get_logger(__name__)

CHECKPOINTS_KEPT = 3
"""Older checkpoints are deleted; the spare ones survive a checkpoint that proves unreadable."""

FORMAT_VERSION = 2
"""Version 1 was a `.npz` zip (up to this change); version 2 is manifest + raw arrays."""
MAGIC = b"FEDMQCKP"
_HEADER = struct.Struct("<8sIIQ")
"""magic, format version, CRC-32 of the manifest, manifest length in bytes."""
ALIGNMENT = 64
"""Arrays start at multiples of this many bytes, so a reader can map them in place."""

_NAME = re.compile(r"^checkpoint-(\d{12})\.ckpt$")
_OLD_NAME = re.compile(r"^checkpoint-(\d{12})\.npz$")
_WEIGHTS_KEY = "weights"
_INTEGER_PREFIX = "int/"
_STRATEGY_PREFIX = "strategy/"


class CheckpointFormatError(ValueError):
    """The checkpoint directory holds only checkpoints this version cannot read."""


@dataclass
class Checkpoint:
    """Everything the aggregator needs to resume exactly where it was."""

    version: int
    weights: npt.NDArray[np.float32]
    integers: dict[str, npt.NDArray[Any]]
    strategy_state: StateDict
    applied_ids: list[str]
    updates_applied: int
    updates_rejected: int
    fingerprint: str
    saved_at: float = field(default_factory=time.time)


class CheckpointStore:
    """A directory of numbered checkpoints; `latest()` is the newest readable one."""

    def __init__(self, directory: Path, *, keep: int = CHECKPOINTS_KEPT) -> None:
        self.directory = directory
        self.keep = keep
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write atomically (temp file, fsync, rename, fsync directory); prune old ones.

        Raises `ValueError` for weights that are not finite: such a model must never
        become the one a restart resumes from.
        """
        _check_finite(checkpoint.weights, checkpoint.strategy_state)
        target = write_checkpoint(self.directory, checkpoint)
        self._prune()
        return target

    def latest(self) -> Checkpoint | None:
        """The newest readable checkpoint, or None when the directory holds none.

        A checkpoint that is torn, corrupt or holds a value that is not finite is logged
        and skipped: the previous good one is resumed from.

        Raises `CheckpointFormatError` when only old-format checkpoints are there: starting
        fresh would silently publish version 0 again over a model trainers already have.
        """
        paths = self._paths()
        for path in reversed(paths):
            try:
                return load_checkpoint(path)
            except (OSError, ValueError, KeyError) as error:
                _log.error("checkpoint_unreadable", path=str(path), error=str(error))
        old = sorted(p.name for p in self.directory.iterdir() if _OLD_NAME.match(p.name))
        if old and not paths:
            raise CheckpointFormatError(
                f"{self.directory} holds only checkpoints in the old .npz format ({old[-1]}),"
                f" which this fedmq version cannot resume from (it writes .ckpt files, format"
                f" {FORMAT_VERSION}): resume with the fedmq version that wrote them, or move"
                " them away to start the task from version 0"
            )
        return None

    def _paths(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def _prune(self) -> None:
        for path in self._paths()[: -self.keep]:
            path.unlink(missing_ok=True)


def checkpoint_name(version: int) -> str:
    """The file name of the checkpoint of `version` (`checkpoint-000000000042.ckpt`)."""
    return f"checkpoint-{version:012d}.ckpt"


def write_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` into `directory` atomically (temp, fsync, rename, fsync directory)."""
    target = directory / checkpoint_name(checkpoint.version)
    handle, temp_name = tempfile.mkstemp(dir=directory, prefix=".partial-")
    try:
        with os.fdopen(handle, "wb", buffering=0) as stream:
            _write(stream, checkpoint)
            os.fsync(stream.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return target


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint file, checking its manifest and every array's CRC-32."""
    with path.open("rb", buffering=0) as stream:
        manifest, data = _read(stream)
    arrays = {spec["key"]: _array(spec, data) for spec in manifest["arrays"]}
    strategy_state: StateDict = dict(manifest["strategy_scalars"])
    integers: dict[str, npt.NDArray[Any]] = {}
    for key, array in arrays.items():
        if key.startswith(_STRATEGY_PREFIX):
            strategy_state[key.removeprefix(_STRATEGY_PREFIX)] = array
        elif key.startswith(_INTEGER_PREFIX):
            integers[key.removeprefix(_INTEGER_PREFIX)] = array
    weights = arrays[_WEIGHTS_KEY]
    if weights.dtype != np.float32 or weights.ndim != 1:
        raise ValueError(f"weights are {weights.dtype} of shape {weights.shape}, not flat float32")
    _check_finite(weights, strategy_state)
    return Checkpoint(
        version=int(manifest["version"]),
        weights=weights,
        integers=integers,
        strategy_state=strategy_state,
        applied_ids=list(manifest["applied_ids"]),
        updates_applied=int(manifest["updates_applied"]),
        updates_rejected=int(manifest["updates_rejected"]),
        fingerprint=str(manifest["fingerprint"]),
        saved_at=float(manifest["saved_at"]),
    )


def _check_finite(weights: npt.NDArray[Any], state: StateDict) -> None:
    """ValueError when the weights or a float array of the strategy hold NaN or Inf."""
    arrays = [("weights", weights)] + [
        (key, value) for key, value in state.items() if isinstance(value, np.ndarray)
    ]
    for key, array in arrays:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"{key!r} holds values that are not finite")


def _write(stream: io.FileIO, checkpoint: Checkpoint) -> None:
    arrays, scalars = _split(checkpoint)
    specs: list[dict[str, Any]] = []
    offset = 0
    for key, array in arrays.items():
        specs.append(
            {
                "key": key,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": array.nbytes,
                "crc32": zlib.crc32(_bytes_of(array)),
            }
        )
        offset = _aligned(offset + array.nbytes)
    manifest = {
        "version": checkpoint.version,
        "applied_ids": checkpoint.applied_ids,
        "updates_applied": checkpoint.updates_applied,
        "updates_rejected": checkpoint.updates_rejected,
        "fingerprint": checkpoint.fingerprint,
        "saved_at": checkpoint.saved_at,
        "strategy_scalars": scalars,
        "arrays": specs,
    }
    text = json.dumps(manifest).encode()
    text += b" " * (_aligned(_HEADER.size + len(text)) - _HEADER.size - len(text))
    _write_all(stream, _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(text), len(text)))
    _write_all(stream, text)
    written = 0
    for spec, array in zip(specs, arrays.values(), strict=True):
        _write_all(stream, bytes(spec["offset"] - written))  # alignment padding
        _write_all(stream, _bytes_of(array))
        written = spec["offset"] + spec["nbytes"]


def _split(checkpoint: Checkpoint) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    arrays: dict[str, npt.NDArray[Any]] = {_WEIGHTS_KEY: checkpoint.weights}
    for name, array in checkpoint.integers.items():
        arrays[_INTEGER_PREFIX + name] = array
    scalars: dict[str, Any] = {}
    for key, value in checkpoint.strategy_state.items():
        if isinstance(value, np.ndarray):
            arrays[_STRATEGY_PREFIX + key] = value
        else:
            scalars[key] = value
    for key, array in arrays.items():
        if array.dtype.hasobject:
            raise ValueError(f"array {key!r} holds Python objects; checkpoints never pickle")
    return arrays, scalars


def _read(stream: io.FileIO) -> tuple[dict[str, Any], memoryview]:
    header = stream.read(_HEADER.size)
    if len(header) != _HEADER.size:
        raise ValueError("the file is shorter than a checkpoint header")
    magic, version, crc, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ValueError("not a fedmq checkpoint (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version}, this fedmq reads {FORMAT_VERSION}")
    text = stream.read(length)
    if len(text) != length or zlib.crc32(text) != crc:
        raise ValueError("the checkpoint manifest is torn or corrupt (CRC mismatch)")
    manifest: dict[str, Any] = json.loads(text)
    size = os.fstat(stream.fileno()).st_size - _HEADER.size - length
    data = bytearray(size)  # writable, so the restored weights are an ordinary array
    if stream.readinto(data) != size:
        raise ValueError("the checkpoint ended early")
    return manifest, memoryview(data)


def _array(spec: dict[str, Any], data: memoryview) -> npt.NDArray[Any]:
    dtype = np.dtype(spec["dtype"])
    if dtype.hasobject:
        raise ValueError(f"array {spec['key']!r} claims an object dtype")
    start, nbytes = int(spec["offset"]), int(spec["nbytes"])
    shape = tuple(int(d) for d in spec["shape"])
    if start + nbytes > len(data) or nbytes != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"array {spec['key']!r} does not fit the file (torn write?)")
    raw = data[start : start + nbytes]
    if zlib.crc32(raw) != spec["crc32"]:
        raise ValueError(f"array {spec['key']!r} fails its CRC-32 (corrupt checkpoint)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _bytes_of(array: npt.NDArray[Any]) -> memoryview:
    """The array's bytes without a copy (a copy only if it is not C-contiguous)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _write_all(stream: io.FileIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = stream.write(view)
        if written is None:  # non-blocking streams only; files never return None
            raise OSError("the checkpoint file refused a write")
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
