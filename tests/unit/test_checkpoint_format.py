"""The checkpoint file format: round trip, corruption detection, old-format refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.aggregator.checkpoint import (
    Checkpoint,
    CheckpointFormatError,
    CheckpointStore,
    load_checkpoint,
)


def _checkpoint(version: int = 3) -> Checkpoint:
    return Checkpoint(
        version=version,
        weights=np.arange(1000, dtype=np.float32) / 7,
        integers={"bn.num_batches_tracked": np.array(12, dtype=np.int64)},
        strategy_state={"steps": 4, "optimizer.m": np.full(1000, 0.5, np.float32)},
        applied_ids=["a", "b"],
        updates_applied=8,
        updates_rejected=1,
        fingerprint="task:model",
    )


def test_a_saved_checkpoint_reads_back_with_every_array_and_scalar(tmp_path: Path) -> None:
    # Given a checkpoint with weights, an integer buffer and strategy moments
    saved = _checkpoint()
    # When it is saved and read back
    path = CheckpointStore(tmp_path).save(saved)
    loaded = load_checkpoint(path)
    # Then nothing is lost and the weights can be updated in place like any array
    np.testing.assert_array_equal(loaded.weights, saved.weights)
    assert loaded.integers["bn.num_batches_tracked"].shape == ()
    assert int(loaded.integers["bn.num_batches_tracked"]) == 12
    assert loaded.strategy_state["steps"] == 4
    np.testing.assert_array_equal(loaded.strategy_state["optimizer.m"], np.full(1000, 0.5))
    assert (loaded.version, loaded.applied_ids, loaded.updates_rejected) == (3, ["a", "b"], 1)
    assert loaded.weights.flags.writeable


def test_a_flipped_weight_byte_fails_the_crc_and_the_previous_checkpoint_is_used(
    tmp_path: Path,
) -> None:
    # Given two checkpoints, the newest with one corrupted byte in its weights
    store = CheckpointStore(tmp_path)
    store.save(_checkpoint(version=1))
    newest = store.save(_checkpoint(version=2))
    raw = bytearray(newest.read_bytes())
    raw[-100] ^= 0xFF
    newest.write_bytes(bytes(raw))
    # When the store looks for the newest readable one
    with pytest.raises(ValueError, match="CRC"):
        load_checkpoint(newest)
    latest = store.latest()
    # Then the corrupted file is skipped
    assert latest is not None and latest.version == 1


def test_a_directory_of_old_npz_checkpoints_is_refused_with_a_clear_reason(
    tmp_path: Path,
) -> None:
    (tmp_path / "checkpoint-000000000007.npz").write_bytes(b"PK old zip")
    with pytest.raises(CheckpointFormatError, match=r"old \.npz format"):
        CheckpointStore(tmp_path).latest()


def test_an_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path).latest() is None
