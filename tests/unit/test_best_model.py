"""The validation-selected best version: kept durably, replaced only by a better val score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas import EvalReport
from services.aggregator.best import (
    BestStore,
    balanced_accuracy,
    best_dir,
    history,
    load_best,
)
from services.aggregator.checkpoint import Checkpoint, CheckpointStore
from services.common.models import build_model, load_state_arrays, state_arrays
from tests.unit.test_trainer_support import TASK, tiny_spec


def _report(version: int, recalls: tuple[float, float], *, split: str = "val") -> EvalReport:
    return EvalReport(
        task_id=TASK, version=version, split=split, loss=0.5, accuracy=sum(recalls) / 2,
        auc=0.9, per_class_accuracy=recalls, num_examples=40, updates_applied=4 * version,
    )  # fmt: skip


def _weights(seed: int) -> dict[str, np.ndarray]:
    spec = tiny_spec()
    model = build_model(
        spec.model, num_classes=2, in_channels=1, image_size=spec.image_size, seed=seed
    )
    return state_arrays(model, copy=True)


def test_the_first_offer_is_kept_and_reads_back_as_the_same_weights_and_scores(
    tmp_path: Path,
) -> None:
    # Given an empty checkpoint directory
    store = BestStore(tmp_path, spec=tiny_spec())
    weights = _weights(1)

    # When version 7 is offered with its val and test scores
    kept = store.offer(
        weights, validation=_report(7, (0.8, 0.9)), test=_report(7, (0.7, 0.95), split="test")
    )

    # Then it is kept, and load_best returns its weights, version, scores and spec
    assert kept
    best = load_best(tmp_path)
    assert best is not None
    assert best.version == 7
    assert best.validation["balanced_accuracy"] == pytest.approx(0.85)
    assert best.validation["split"] == "val"
    assert best.test is not None and best.test["accuracy"] == pytest.approx(0.825)
    assert best.metadata["selected_by"]["metric"] == "balanced_accuracy"
    restored = best.state_arrays()
    assert list(restored) == list(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(restored[name], array)
        assert restored[name].dtype == array.dtype
    model = build_model(best.spec.model, num_classes=2, in_channels=1, image_size=8, seed=99)
    load_state_arrays(model, restored)
    first = next(iter(model.state_dict().values()))
    assert torch.equal(first, torch.from_numpy(weights[next(iter(weights))]))


def test_a_restarted_store_replaces_the_best_only_with_a_strictly_better_val_score(
    tmp_path: Path,
) -> None:
    # Given version 3 kept with balanced accuracy 0.8
    BestStore(tmp_path, spec=tiny_spec()).offer(_weights(3), validation=_report(3, (0.7, 0.9)))

    # When a new store (a restarted evaluator) is offered version 3 again, an equal score,
    # a worse one and finally a better one
    store = BestStore(tmp_path, spec=tiny_spec())
    offers = [
        store.offer(_weights(3), validation=_report(3, (0.7, 0.9))),
        store.offer(_weights(4), validation=_report(4, (0.9, 0.7))),
        store.offer(_weights(5), validation=_report(5, (0.5, 1.0))),
        store.offer(_weights(6), validation=_report(6, (0.85, 0.9))),
    ]

    # Then only the better one replaced it, each selection was written exactly once,
    # and the replaced weights file is gone
    assert offers == [False, False, False, True]
    best = load_best(tmp_path)
    assert best is not None and best.version == 6
    assert [line["version"] for line in history(tmp_path)] == [3, 6]
    assert sorted(p.name for p in best_dir(tmp_path).glob("*.ckpt")) == [
        "checkpoint-000000000006.ckpt"
    ]


def test_the_aggregators_pruning_never_removes_the_best_version(tmp_path: Path) -> None:
    # Given a best version kept next to the aggregator's checkpoints
    BestStore(tmp_path, spec=tiny_spec()).offer(_weights(2), validation=_report(2, (0.8, 0.8)))
    checkpoints = CheckpointStore(tmp_path, keep=2)

    # When the aggregator writes and prunes many checkpoints
    for version in range(10):
        checkpoints.save(
            Checkpoint(
                version=version,
                weights=np.zeros(4, np.float32),
                integers={},
                strategy_state={},
                applied_ids=[],
                updates_applied=0,
                updates_rejected=0,
                fingerprint="f",
            )
        )

    # Then the best version is still there, and the aggregator resumes from its own newest
    best = load_best(tmp_path)
    assert best is not None and best.version == 2
    latest = checkpoints.latest()
    assert latest is not None and latest.version == 9


def test_a_crash_between_the_weights_and_the_metadata_leaves_the_previous_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given version 1 kept
    store = BestStore(tmp_path, spec=tiny_spec())
    store.offer(_weights(1), validation=_report(1, (0.6, 0.6)))

    # When writing best.json for a better version 2 fails after its weights were written
    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("services.aggregator.best._write_json_atomically", crash)
    with pytest.raises(OSError):
        store.offer(_weights(2), validation=_report(2, (0.9, 0.9)))
    monkeypatch.undo()

    # Then version 1 is still the best on disk, and a restarted store selects 2 exactly once
    best = load_best(tmp_path)
    assert best is not None and best.version == 1
    restarted = BestStore(tmp_path, spec=tiny_spec())
    assert restarted.offer(_weights(2), validation=_report(2, (0.9, 0.9)))
    assert [line["version"] for line in history(tmp_path)] == [1, 2]


def test_no_best_version_yet_reads_as_none_and_a_corrupt_record_is_a_clear_error(
    tmp_path: Path,
) -> None:
    # Given no best version, then a best.json that is not JSON
    assert load_best(tmp_path) is None
    best_dir(tmp_path).mkdir()
    (best_dir(tmp_path) / "best.json").write_text("{not json")

    # When it is loaded, Then the error names the file
    with pytest.raises(ValueError, match=r"best\.json"):
        load_best(tmp_path)


def test_balanced_accuracy_is_the_mean_recall_and_falls_back_to_accuracy() -> None:
    # Given a report with per-class recalls and one without
    with_recalls = _report(1, (1.0, 0.0))
    without = with_recalls.model_copy(update={"per_class_accuracy": (), "accuracy": 0.7})

    # Then balanced accuracy is their mean, or the accuracy
    assert balanced_accuracy(with_recalls) == 0.5
    assert balanced_accuracy(without) == 0.7
    assert json.loads(json.dumps(balanced_accuracy(without))) == 0.7
