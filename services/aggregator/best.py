"""The validation-selected best version: a durable artifact next to a task's checkpoints.

The aggregator checkpoints task `T` into `<checkpoint_dir>/T/` (`task_checkpoint_dir`) and
keeps only its newest few checkpoints there. The evaluator scores every version it evaluates
on the `val` split and keeps the best one in `<checkpoint_dir>/T/best/`, never pruned. It holds

- `checkpoint-<version>.ckpt`: the weights, in the aggregator's checkpoint format
  (`load_checkpoint` reads it; no strategy state, no applied ids);
- `best.json`: which version, why it was selected (split, metric, scores), its test scores
  when they were measured, the task spec and the tensor layout needed to rebuild the model;
- `history.jsonl`: one line per improvement, in order (what was selected, when).

`best.json` is the commit point: the weights file is written (atomically) first, then
`best.json` replaces the previous one atomically, then older weight files are removed. A
crash at any moment leaves the previous selection or the new one, never a mix, and a
restarted evaluator reads `best.json` back, so the same version (or an equal score) is
never selected twice.

Selection metric: balanced accuracy on `val` (the mean of the per-class recalls), ties
broken by val AUC, then by lower val loss. Balanced accuracy rather than accuracy because
the class mix of `val` (PneumoniaMNIST: 74% pneumonia) differs from that of `test` (62.5%)
and of a deployment: plain accuracy would favour versions that lean to the majority class.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from schemas import EvalReport, TaskSpec
from services.aggregator.checkpoint import (
    Checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from services.aggregator.layout import ParamLayout

BEST_DIR_NAME = "best"
METADATA_FILE = "best.json"
HISTORY_FILE = "history.jsonl"
FORMAT = 1
SELECTION_SPLIT = "val"
SELECTION_METRIC = "balanced_accuracy"
TIE_BREAKERS = ("auc", "-loss")

_log = structlog.get_logger(__name__)


def task_checkpoint_dir(checkpoint_dir: Path, task_id: str) -> Path:
    """The directory the aggregator given `--checkpoint-dir checkpoint_dir` writes task `task_id`
    checkpoints to; the best version is kept in its `best/` subdirectory."""
    return checkpoint_dir / task_id


def best_dir(task_dir: Path) -> Path:
    """`<task_dir>/best`: the best artifact of the task whose checkpoints are in `task_dir`."""
    return task_dir / BEST_DIR_NAME


def balanced_accuracy(report: EvalReport) -> float:
    """Mean per-class recall of `report`; its plain accuracy when per-class is absent."""
    per_class = report.per_class_accuracy
    return float(sum(per_class) / len(per_class)) if per_class else report.accuracy


def selection_key(report: EvalReport) -> tuple[float, float, float]:
    """What `report` (on the selection split) is ranked by: higher is better."""
    auc = -math.inf if report.auc is None else report.auc
    return (balanced_accuracy(report), auc, -report.loss)


def scores(report: EvalReport) -> dict[str, Any]:
    """The scores of one report as they appear in `best.json`."""
    return {
        "split": report.split,
        "balanced_accuracy": balanced_accuracy(report),
        "accuracy": report.accuracy,
        "auc": report.auc,
        "loss": report.loss,
        "per_class_accuracy": list(report.per_class_accuracy),
        "num_examples": report.num_examples,
    }


@dataclass(frozen=True)
class BestModel:
    """The selected version as read back from disk: weights plus what it was selected by.

    `metadata` is the parsed `best.json`; the properties below name its main fields.
    """

    directory: Path
    metadata: dict[str, Any]
    checkpoint: Checkpoint

    @property
    def version(self) -> int:
        """The model version that was selected."""
        return int(self.metadata["version"])

    @property
    def spec(self) -> TaskSpec:
        """The task spec: model name, classes, channels and image size to rebuild the model."""
        return TaskSpec.model_validate(self.metadata["spec"])

    @property
    def validation(self) -> dict[str, Any]:
        """Scores on the selection split (`balanced_accuracy`, `accuracy`, `auc`, `loss`, ...)."""
        return dict(self.metadata["validation"])

    @property
    def test(self) -> dict[str, Any] | None:
        """Scores of the same version on `test`, when the evaluator measured them."""
        value = self.metadata.get("test")
        return None if value is None else dict(value)

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """`name -> array` in `state_dict` order, ready for `load_state_arrays(model, ...)`."""
        layout = ParamLayout.from_entries(
            (t["name"], t["dtype"], t["shape"]) for t in self.metadata["tensors"]
        )
        return layout.unflatten(self.checkpoint.weights, integers=self.checkpoint.integers)


def load_best(task_dir: Path) -> BestModel | None:
    """The validation-selected best version kept in `<task_dir>/best/`.

    `task_dir` is the task's checkpoint directory, the one holding `checkpoint-*.ckpt`:
    `task_checkpoint_dir(checkpoint_dir, task_id)`, i.e. `runs/checkpoints/<task_id>` with the
    services' default `--checkpoint-dir runs/checkpoints`.

    Returns None when no version was selected yet (no `best/best.json`). Raises `ValueError`
    (with the path) when `best.json` or the weights file it names is unreadable or corrupt
    (the weights' CRC-32 is checked), and `OSError` when the files cannot be read.

    To rebuild the model::

        best = load_best(task_checkpoint_dir(Path("runs/checkpoints"), "pneumonia"))
        model = build_model(best.spec.model, num_classes=best.spec.num_classes,
                            in_channels=best.spec.in_channels, image_size=best.spec.image_size)
        load_state_arrays(model, best.state_arrays())

    `best.version`, `best.validation` (the selection scores) and `best.test` (test scores,
    or None) say what was selected and how it scored; `best.metadata` is all of `best.json`.
    """
    directory = best_dir(task_dir)
    metadata = _read_metadata(directory)
    if metadata is None:
        return None
    path = directory / str(metadata["checkpoint_file"])
    checkpoint = load_checkpoint(path)
    if checkpoint.version != int(metadata["version"]):
        raise ValueError(
            f"{path} holds version {checkpoint.version}, {METADATA_FILE} says {metadata['version']}"
        )
    return BestModel(directory=directory, metadata=metadata, checkpoint=checkpoint)


class BestStore:
    """Keeps the best version offered so far (by `selection_key` on val) in `<task_dir>/best/`."""

    def __init__(self, task_dir: Path, *, spec: TaskSpec) -> None:
        self.directory = best_dir(task_dir)
        self._spec = spec
        self._log = _log.bind(task=spec.task_id, path=str(self.directory))
        self.metadata = self._resume()
        self.writes = 0

    @property
    def version(self) -> int | None:
        """The version currently kept, or None before the first selection."""
        return None if self.metadata is None else int(self.metadata["version"])

    def is_better(self, validation: EvalReport) -> bool:
        """Whether a version scoring `validation` would replace the one kept (strictly better)."""
        if self.metadata is None:
            return True
        kept = self.metadata["validation"]
        kept_key = (
            float(kept["balanced_accuracy"]),
            -math.inf if kept["auc"] is None else float(kept["auc"]),
            -float(kept["loss"]),
        )
        return selection_key(validation) > kept_key

    def offer(
        self,
        arrays: Mapping[str, npt.NDArray[Any]],
        *,
        validation: EvalReport,
        test: EvalReport | None = None,
    ) -> bool:
        """Keep the version of `validation` (weights `arrays`) if it scores better; True if kept.

        An equal score is not better: the earlier version stays, and a version offered again
        after a restart is not written twice.
        """
        if validation.split != SELECTION_SPLIT:
            raise ValueError(f"selection is on {SELECTION_SPLIT!r}, not {validation.split!r}")
        if not self.is_better(validation):
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        layout = ParamLayout.from_arrays(arrays)
        checkpoint = Checkpoint(
            version=validation.version,
            weights=layout.flatten(arrays),
            integers={name: np.array(arrays[name]) for name in layout.integer_names},
            strategy_state={},
            applied_ids=[],
            updates_applied=validation.updates_applied,
            updates_rejected=0,
            fingerprint=_fingerprint(self._spec),
        )
        path = write_checkpoint(self.directory, checkpoint)
        validation_scores = scores(validation)
        metadata: dict[str, Any] = {
            "format": FORMAT,
            "task_id": self._spec.task_id,
            "fingerprint": _fingerprint(self._spec),
            "version": validation.version,
            "updates_applied": validation.updates_applied,
            "model_published_at": validation.model_published_at,
            "selected_at": time.time(),
            "selected_by": {
                "split": SELECTION_SPLIT,
                "metric": SELECTION_METRIC,
                "tie_breakers": list(TIE_BREAKERS),
            },
            "validation": validation_scores,
            "test": None if test is None else scores(test),
            "checkpoint_file": path.name,
            "spec": self._spec.model_dump(mode="json"),
            "tensors": [
                {"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in layout.entries
            ],
        }
        _write_json_atomically(self.directory / METADATA_FILE, metadata)
        self.metadata = metadata
        self.writes += 1
        self._append_history(metadata)
        self._remove_others(path.name)
        self._log.info(
            "best version selected",
            version=validation.version,
            val_balanced_accuracy=validation_scores["balanced_accuracy"],
        )
        return True

    def _resume(self) -> dict[str, Any] | None:
        try:
            metadata = _read_metadata(self.directory)
        except (OSError, ValueError) as error:
            self._log.error("best.json unreadable; selecting afresh", error=str(error))
            return None
        if metadata is None:
            return None
        if metadata.get("fingerprint") != _fingerprint(self._spec):
            self._log.warning(
                "the kept best version is of another task or model; selecting afresh",
                kept=metadata.get("fingerprint"),
            )
            return None
        self._repair_history(metadata)
        self._log.info("resuming the best version", version=metadata["version"])
        return metadata

    def _append_history(self, metadata: Mapping[str, Any]) -> None:
        line = {
            "version": metadata["version"],
            "selected_at": metadata["selected_at"],
            "validation": metadata["validation"],
            "test": metadata["test"],
        }
        with (self.directory / HISTORY_FILE).open("ab") as sink:
            sink.write((json.dumps(line, separators=(",", ":")) + "\n").encode())
            sink.flush()
            os.fsync(sink.fileno())

    def _repair_history(self, metadata: Mapping[str, Any]) -> None:
        """A crash between `best.json` and its history line: add the line now, once."""
        path = self.directory / HISTORY_FILE
        last = None
        if path.exists():
            for raw in path.read_bytes().splitlines():
                try:
                    last = json.loads(raw)
                except ValueError:
                    continue
        if last is None or last.get("version") != metadata["version"]:
            self._append_history(metadata)

    def _remove_others(self, keep: str) -> None:
        for path in self.directory.glob("checkpoint-*.ckpt"):
            if path.name != keep:
                path.unlink(missing_ok=True)


def history(task_dir: Path) -> list[dict[str, Any]]:
    """Every selection made so far in `<task_dir>/best/`, oldest first (empty when none)."""
    path = best_dir(task_dir) / HISTORY_FILE
    if not path.exists():
        return []
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # a torn last line after a crash
    return lines


def _fingerprint(spec: TaskSpec) -> str:
    # The same fields as the aggregator's task fingerprint: same task, same model.
    return f"{spec.task_id}:{spec.model}:{spec.num_classes}:{spec.in_channels}:{spec.image_size}"


def _read_metadata(directory: Path) -> dict[str, Any] | None:
    path = directory / METADATA_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        metadata = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a best-version record of format {FORMAT}")
    for key in ("version", "checkpoint_file", "validation", "spec", "tensors"):
        if key not in metadata:
            raise ValueError(f"{path} lacks {key!r}")
    return metadata


def _write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(json.dumps(document, indent=2).encode())
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
