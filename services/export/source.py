"""Which weights to export: a federated task's checkpoint directory or a centralized run.

A checkpoint holds a flat weight vector and a fingerprint (`task:model:classes:channels:
size`); the model is rebuilt from the zoo by that fingerprint and the vector laid back into
its `state_dict` with the aggregator's own `ParamLayout`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from torch import nn

from services.aggregator.best import BEST_DIR_NAME, BestModel, load_best
from services.aggregator.checkpoint import Checkpoint, CheckpointStore, load_checkpoint
from services.aggregator.layout import ParamLayout
from services.centralized.trainer import MODEL_DIR as CENTRALIZED_CHECKPOINTS
from services.common.models import build_model, load_state_arrays, state_arrays

_CHECKPOINT = re.compile(r"^checkpoint-(\d{12})\.ckpt$")
_PRIVACY_STEPS = "privacy/steps"


class SourceError(ValueError):
    """Nothing exportable where the user pointed, said in a sentence."""


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint says about its model: `task:model:classes:channels:size`."""

    task_id: str
    model: str
    num_classes: int
    in_channels: int
    image_size: int

    @classmethod
    def parse(cls, text: str) -> Fingerprint:
        """Split a checkpoint's fingerprint (task ids never contain a colon)."""
        parts = text.rsplit(":", 4)
        if len(parts) != 5:
            raise SourceError(f"checkpoint fingerprint {text!r} is not task:model:K:C:S")
        task_id, model, classes, channels, size = parts
        return cls(task_id, model, int(classes), int(channels), int(size))

    def __str__(self) -> str:
        f = self
        return f"{f.task_id}:{f.model}:{f.num_classes}:{f.in_channels}:{f.image_size}"


@dataclass(frozen=True)
class ExportSource:
    """One model version ready to export, and what is known about how it was made."""

    kind: Literal["federated", "centralized"]
    """`federated` or `centralized`."""
    selection: str
    checkpoint: Checkpoint
    path: Path
    fingerprint: Fingerprint
    data_source: str | None
    """The data source the run recorded (centralized runs); None when unknown."""
    recorded_scores: dict[str, Any] | None = None

    @property
    def dp_steps(self) -> int | None:
        """Noisy releases counted by central DP's state in the checkpoint; None without DP."""
        value = self.checkpoint.strategy_state.get(_PRIVACY_STEPS)
        return None if value is None else int(str(value))

    @property
    def published_releases(self) -> int:
        """Noisy versions the task ever published (the aggregator's privacy ledger; 0: none)."""
        from services.aggregator.privacy_ledger import PrivacyLedger

        task_dir = self.path.parent.parent if self.selection == "best-on-val" else self.path.parent
        return PrivacyLedger(task_dir).steps

    def model(self) -> nn.Module:
        """The zoo model with the checkpoint's weights, in eval mode."""
        f = self.fingerprint
        model = build_model(
            f.model, num_classes=f.num_classes, in_channels=f.in_channels, image_size=f.image_size
        )
        load_state_arrays(model, self.state_arrays(model))
        return model.eval()

    def state_arrays(self, model: nn.Module) -> dict[str, npt.NDArray[Any]]:
        """The checkpoint's weights as `name -> array` in `model`'s `state_dict` order."""
        layout = ParamLayout.from_arrays(state_arrays(model))
        return layout.unflatten(
            np.asarray(self.checkpoint.weights, dtype=np.float32),
            integers=self.checkpoint.integers,
        )


def find_source(path: Path, *, version: int | None = None, latest: bool = False) -> ExportSource:
    """The checkpoint `path` designates: a task's checkpoint directory or a centralized run.

    Default: the evaluator's validation-selected best version (`best/`) when there is one,
    else the newest readable checkpoint; `latest`: the newest; `version`: exactly that one.
    """
    if not path.is_dir():
        raise SourceError(f"{path} is not a directory")
    manifest = _centralized_manifest(path)
    directory = path / CENTRALIZED_CHECKPOINTS if manifest is not None else path
    best = None if manifest is not None else _best(directory)
    if best is not None and version is None and not latest:
        return _best_source(best)
    if not any(_CHECKPOINT.match(p.name) for p in _listing(directory)):
        raise SourceError(_no_checkpoint_message(path, manifest is not None))
    kind: Literal["federated", "centralized"] = (
        "centralized" if manifest is not None else "federated"
    )
    data_source = (
        manifest.get("config", {}).get("data_source")
        if manifest is not None
        else (None if best is None else best.spec.dataset)
    )
    if version is not None:
        checkpoint_path = directory / f"checkpoint-{version:012d}.ckpt"
        if not checkpoint_path.is_file():
            raise SourceError(
                f"no checkpoint of version {version} in {directory}; it holds versions"
                f" {_versions(directory)} (the aggregator keeps only its newest few)"
            )
        checkpoint = load_checkpoint(checkpoint_path)
        return _source(kind, "version", checkpoint, checkpoint_path, data_source)
    newest = CheckpointStore(directory).latest()
    if newest is None:
        raise SourceError(f"no readable checkpoint in {directory}")
    newest_path = directory / f"checkpoint-{newest.version:012d}.ckpt"
    return _source(kind, "latest", newest, newest_path, data_source)


def _best(directory: Path) -> BestModel | None:
    try:
        return load_best(directory)
    except (OSError, ValueError) as error:
        raise SourceError(
            f"the best version in {directory / BEST_DIR_NAME} is unreadable ({error}):"
            " export --latest or --version N instead"
        ) from error


def _best_source(best: BestModel) -> ExportSource:
    recorded: dict[str, Any] = {
        key: best.metadata.get(key)
        for key in ("selected_by", "validation", "test", "selected_at")
        if key in best.metadata
    }
    return ExportSource(
        kind="federated",
        selection="best-on-val",
        checkpoint=best.checkpoint,
        path=best.directory / str(best.metadata["checkpoint_file"]),
        fingerprint=Fingerprint.parse(best.checkpoint.fingerprint),
        data_source=best.spec.dataset,
        recorded_scores=recorded,
    )


def _source(
    kind: Literal["federated", "centralized"],
    selection: str,
    checkpoint: Checkpoint,
    path: Path,
    data_source: str | None,
) -> ExportSource:
    return ExportSource(
        kind=kind,
        selection=selection,
        checkpoint=checkpoint,
        path=path,
        fingerprint=Fingerprint.parse(checkpoint.fingerprint),
        data_source=data_source,
    )


def _centralized_manifest(path: Path) -> dict[str, Any] | None:
    manifest = path / "run.json"
    if not manifest.is_file():
        return None
    document: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
    return document if document.get("kind") == "centralized" else None


def _listing(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def _versions(directory: Path) -> list[int]:
    found = (_CHECKPOINT.match(p.name) for p in _listing(directory))
    return sorted(int(m.group(1)) for m in found if m)


def _no_checkpoint_message(path: Path, centralized: bool) -> str:
    if centralized:
        return (
            f"{path} is a centralized run without a saved model ({CENTRALIZED_CHECKPOINTS}/"
            "is missing or empty): rerun it with this fedmq version, which saves its model"
        )
    tasks = sorted(p.name for p in _listing(path) if p.is_dir() and _versions(p))
    hint = f"; its task directories: {', '.join(tasks)}" if tasks else ""
    return (
        f"no checkpoint-*.ckpt in {path}: pass the task's directory"
        f" (<checkpoint dir>/<task id>) or a centralized run directory{hint}"
    )
