"""Atomic on-disk checkpoints of the aggregator: weights, version, strategy state, applied ids.

A checkpoint is one `.npz` file (no pickle: numpy arrays plus a JSON metadata blob), written
to a temporary name, fsynced, then renamed, so a crash leaves either the old or the new one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import zipfile
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

_NAME = re.compile(r"^checkpoint-(\d{12})\.npz$")
_META_KEY = "meta.json"
_WEIGHTS_KEY = "weights"
_INTEGER_PREFIX = "int/"
_STRATEGY_PREFIX = "strategy/"


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
        """Write atomically (temp file, fsync, rename, fsync directory); prune old ones."""
        target = self.directory / f"checkpoint-{checkpoint.version:012d}.npz"
        handle, temp_name = tempfile.mkstemp(dir=self.directory, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, allow_pickle=False, **_to_arrays(checkpoint))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)
        self._prune()
        return target

    def latest(self) -> Checkpoint | None:
        """The newest readable checkpoint, or None when the directory holds none."""
        for path in reversed(self._paths()):
            try:
                return load_checkpoint(path)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
                _log.error("checkpoint_unreadable", path=str(path), error=str(error))
        return None

    def _paths(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def _prune(self) -> None:
        for path in self._paths()[: -self.keep]:
            path.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint file (never unpickles anything)."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(bytes(archive[_META_KEY]).decode())
        integers = {
            key.removeprefix(_INTEGER_PREFIX): archive[key]
            for key in archive.files
            if key.startswith(_INTEGER_PREFIX)
        }
        strategy_state: StateDict = dict(meta["strategy_scalars"])
        for key in archive.files:
            if key.startswith(_STRATEGY_PREFIX):
                strategy_state[key.removeprefix(_STRATEGY_PREFIX)] = archive[key]
        weights = np.ascontiguousarray(archive[_WEIGHTS_KEY], dtype=np.float32)
    return Checkpoint(
        version=int(meta["version"]),
        weights=weights,
        integers=integers,
        strategy_state=strategy_state,
        applied_ids=list(meta["applied_ids"]),
        updates_applied=int(meta["updates_applied"]),
        updates_rejected=int(meta["updates_rejected"]),
        fingerprint=str(meta["fingerprint"]),
        saved_at=float(meta["saved_at"]),
    )


def _to_arrays(checkpoint: Checkpoint) -> dict[str, npt.NDArray[Any]]:
    arrays: dict[str, npt.NDArray[Any]] = {_WEIGHTS_KEY: checkpoint.weights}
    for name, array in checkpoint.integers.items():
        arrays[_INTEGER_PREFIX + name] = array
    scalars: dict[str, Any] = {}
    for key, value in checkpoint.strategy_state.items():
        if isinstance(value, np.ndarray):
            arrays[_STRATEGY_PREFIX + key] = value
        else:
            scalars[key] = value
    meta = {
        "version": checkpoint.version,
        "applied_ids": checkpoint.applied_ids,
        "updates_applied": checkpoint.updates_applied,
        "updates_rejected": checkpoint.updates_rejected,
        "fingerprint": checkpoint.fingerprint,
        "saved_at": checkpoint.saved_at,
        "strategy_scalars": scalars,
    }
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
