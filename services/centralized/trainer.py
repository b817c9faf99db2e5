"""The centralised baseline: one process trains the task's model on the pooled train split.

Same model zoo, data sources, optimiser and hyperparameters as a federated task; the test
split is evaluated periodically and each evaluation is appended to `<run_dir>/eval.jsonl`
as the `EvalReport` the federated evaluator writes, so `fedmq report` compares both. The
final model is saved in `<run_dir>/checkpoints/` for `fedmq export`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from schemas import EvalReport
from services.aggregator.checkpoint import Checkpoint, CheckpointStore
from services.aggregator.layout import ParamLayout
from services.common.data import ImageDataset, load_site_dataset
from services.common.models import build_model, state_arrays
from services.common.training import (
    EvalResult,
    LogitAdjustment,
    TrainConfig,
    build_optimizer,
    evaluate,
    train_step,
)
from services.report.logs import EVAL_LOG_FILE, append_eval_report
from services.report.manifest import RunManifest, write_manifest

DEFAULT_DATA_SOURCE = "medmnist:pneumoniamnist"
EVAL_SPLIT = "test"
"""The split the federated evaluator reports on; the baseline must report on the same."""
MODEL_DIR = "checkpoints"
"""The final model, in the aggregator's checkpoint format, for `fedmq export RUN_DIR`."""

_TASK_ID_INVALID = re.compile(r"[^A-Za-z0-9_-]")
_TASK_ID_MAX = 64

Clock = Callable[[], float]


class RunDirectoryInUse(ValueError):
    """The run directory already holds an eval log and overwriting was not asked for."""


class TrainingDiverged(RuntimeError):
    """The test loss became NaN or infinite: the learning rate is too high for this model."""


@dataclass(frozen=True)
class CentralizedConfig:
    """One centralised run. `eval_every_seconds=None` evaluates after every epoch."""

    run_dir: Path
    name: str
    model: str = "cnn-small"
    data_source: str = DEFAULT_DATA_SOURCE
    data_dir: Path | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5))
    budget_seconds: float | None = None
    """Wall-clock budget from the run's start: no batch starts after it (a final eval does)."""
    eval_every_seconds: float | None = None
    channels: int | None = None
    """Input channels (None: the dataset's own)."""
    image_size: int | None = None
    """Input side in pixels (None: the dataset's own)."""
    overwrite: bool = False
    """Replace the eval log of an earlier run in `run_dir` (else `RunDirectoryInUse`)."""

    def __post_init__(self) -> None:
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"budget_seconds must be > 0, got {self.budget_seconds}")
        if self.eval_every_seconds is not None and not self.eval_every_seconds > 0:
            raise ValueError(f"eval_every_seconds must be > 0, got {self.eval_every_seconds}")


@dataclass(frozen=True)
class EvalEvent:
    """An evaluation as it happens: the report written, and where training stood."""

    report: EvalReport
    epochs: float
    """Epochs trained so far (fractional mid-epoch)."""
    seconds: float
    """Wall-clock seconds since the run's start, at the end of the evaluation."""


@dataclass(frozen=True)
class CentralizedResult:
    """What a run did; `epoch_seconds` are training seconds of each finished epoch (no eval)."""

    run_dir: Path
    manifest: RunManifest
    reports: tuple[EvalReport, ...]
    steps: int
    epoch_seconds: tuple[float, ...]
    seconds: float
    stopped_by_budget: bool


class Observer(Protocol):
    """Watches a run (progress output); every method is called on the training thread."""

    def on_eval(self, event: EvalEvent) -> None:
        """An evaluation was written."""

    def on_epoch(self, epoch: int, seconds: float) -> None:
        """Epoch `epoch` (1-based) finished after `seconds` of training (evaluations excluded)."""


class SilentObserver:
    """The default observer: does nothing."""

    def on_eval(self, event: EvalEvent) -> None:
        """Ignore the evaluation."""

    def on_epoch(self, epoch: int, seconds: float) -> None:
        """Ignore the epoch."""


def task_id_for(name: str) -> str:
    """A valid `EvalReport.task_id` from a run name (invalid characters become `-`)."""
    cleaned = _TASK_ID_INVALID.sub("-", name)[:_TASK_ID_MAX]
    return cleaned or "centralized"


def run_centralized(
    config: CentralizedConfig, *, observer: Observer | None = None, clock: Clock = time.time
) -> CentralizedResult:
    """Train and evaluate as `config` says; writes `run.json` and `eval.jsonl` in `run_dir`."""
    return CentralizedRun(config, observer=observer or SilentObserver(), clock=clock).run()


class CentralizedRun:
    """State of one run: the model, its optimiser, the step counter and the eval schedule."""

    def __init__(self, config: CentralizedConfig, *, observer: Observer, clock: Clock) -> None:
        self._log = Path(config.run_dir) / EVAL_LOG_FILE
        if self._log.exists() and not config.overwrite:
            raise RunDirectoryInUse(
                f"{self._log} exists: choose another run directory or overwrite it"
            )
        self._config = config
        self._observer = observer
        self._clock = clock
        self._started_at = clock()
        self._train_set, self._test_set = _load_splits(config)
        self._model = _build(config, self._train_set)
        self._optimizer = build_optimizer(self._model, config.train)
        self._loader = _train_loader(self._train_set, config.train)
        self._adjustment = LogitAdjustment.of(self._train_set, config.train.logit_adjustment)
        self._manifest = _manifest(config, self._started_at, self._train_set, self._test_set)
        self._reports: list[EvalReport] = []
        self._steps = 0
        self._eval_seconds = 0.0
        self._next_timed_eval = self._started_at + (config.eval_every_seconds or math.inf)
        self._stopped_by_budget = False

    def run(self) -> CentralizedResult:
        """Evaluate the initial model, train epoch by epoch, evaluate at the end."""
        write_manifest(self._config.run_dir, self._manifest)
        self._log.unlink(missing_ok=True)  # a run directory holds one run (overwrite)
        self._evaluate()
        epoch_seconds: list[float] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._config.train.seed)  # dropout masks
            for epoch in range(1, self._config.train.epochs + 1):
                seconds = self._train_epoch()
                if self._stopped_by_budget:
                    break
                epoch_seconds.append(seconds)
                self._observer.on_epoch(epoch, seconds)
                if self._config.eval_every_seconds is None:
                    self._evaluate()
        if self._reports[-1].updates_applied != self._steps:
            self._evaluate()
        self._save_model()
        return CentralizedResult(
            run_dir=Path(self._config.run_dir),
            manifest=self._manifest,
            reports=tuple(self._reports),
            steps=self._steps,
            epoch_seconds=tuple(epoch_seconds),
            seconds=self._clock() - self._started_at,
            stopped_by_budget=self._stopped_by_budget,
        )

    def _train_epoch(self) -> float:
        started, eval_before = time.perf_counter(), self._eval_seconds
        self._model.train()
        for images, labels in self._loader:
            if self._over_budget():
                self._stopped_by_budget = True
                break
            train_step(self._model, self._optimizer, images, labels, self._adjustment)
            self._steps += 1
            if self._clock() >= self._next_timed_eval:
                self._evaluate()
        return time.perf_counter() - started - (self._eval_seconds - eval_before)

    def _save_model(self) -> None:
        """Keep the final model (the last evaluated one) for `fedmq export`."""
        arrays = state_arrays(self._model)
        layout = ParamLayout.from_arrays(arrays)
        height = self._train_set.image_size[0]
        fingerprint = (
            f"{task_id_for(self._config.name)}:{self._config.model}:"
            f"{self._train_set.num_classes}:{self._train_set.channels}:{height}"
        )
        checkpoint = Checkpoint(
            version=self._reports[-1].version,
            weights=layout.flatten(arrays),
            integers={name: np.array(arrays[name]) for name in layout.integer_names},
            strategy_state={},
            applied_ids=[],
            updates_applied=self._steps,
            updates_rejected=0,
            fingerprint=fingerprint,
        )
        CheckpointStore(Path(self._config.run_dir) / MODEL_DIR, keep=1).save(checkpoint)

    def _over_budget(self) -> bool:
        budget = self._config.budget_seconds
        return budget is not None and self._clock() - self._started_at >= budget

    def _evaluate(self) -> None:
        tick = time.perf_counter()
        snapshot_at = self._clock()
        _check_finite(self._model, self._steps)
        result = evaluate(self._model, self._test_set)
        if not math.isfinite(result.loss):
            raise TrainingDiverged(
                f"test loss is {result.loss} after {self._steps} steps: lower the learning rate"
            )
        report = _report(
            result, self._manifest, version=len(self._reports), steps=self._steps,
            snapshot_at=snapshot_at, evaluated_at=self._clock(),
        )  # fmt: skip
        append_eval_report(self._log, report)
        self._reports.append(report)
        self._eval_seconds += time.perf_counter() - tick
        if self._config.eval_every_seconds is not None:
            self._next_timed_eval = self._clock() + self._config.eval_every_seconds
        self._observer.on_eval(
            EvalEvent(report, self._steps / len(self._loader), self._clock() - self._started_at)
        )


def _load_splits(config: CentralizedConfig) -> tuple[ImageDataset, ImageDataset]:
    def load(split: str) -> ImageDataset:
        # No `site`: the whole split, pooled: what every federated site holds, together.
        return load_site_dataset(
            config.data_source, split=split, data_dir=config.data_dir,
            channels=config.channels, size=config.image_size,
        )  # fmt: skip

    return load("train"), load(EVAL_SPLIT)


def _build(config: CentralizedConfig, train_set: ImageDataset) -> nn.Module:
    height, width = train_set.image_size
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width}: pass an image size")
    return build_model(
        config.model, num_classes=train_set.num_classes, in_channels=train_set.channels,
        image_size=height, seed=config.train.seed,
    )  # fmt: skip


def _train_loader(
    dataset: ImageDataset, config: TrainConfig
) -> DataLoader[tuple[torch.Tensor, int]]:
    if len(dataset) == 0:
        raise ValueError("the train split is empty")
    generator = torch.Generator().manual_seed(config.seed)
    # As in federated training: a trailing batch of one breaks BatchNorm in train mode.
    drop_last = len(dataset) > 1 and len(dataset) % config.batch_size == 1
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
        drop_last=drop_last, num_workers=0,
    )  # fmt: skip


def _check_finite(model: nn.Module, steps: int) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(
                f"{name} holds NaN or Inf after {steps} steps: lower the learning rate"
            )


def _manifest(
    config: CentralizedConfig, started_at: float, train_set: ImageDataset, test_set: ImageDataset
) -> RunManifest:
    settings = {
        "data_source": config.data_source,
        "data_dir": None if config.data_dir is None else str(config.data_dir),
        **asdict(config.train),
        "budget_seconds": config.budget_seconds,
        "eval_every_seconds": config.eval_every_seconds,
        "eval_split": EVAL_SPLIT,
        "channels": train_set.channels,
        "image_size": train_set.image_size[0],
        "num_classes": train_set.num_classes,
        "train_examples": len(train_set),
        "test_examples": len(test_set),
        "torch_threads": torch.get_num_threads(),
    }
    return RunManifest(
        name=config.name, kind="centralized", model=config.model, started_at=started_at,
        config=settings,
    )  # fmt: skip


def _report(
    result: EvalResult,
    manifest: RunManifest,
    *,
    version: int,
    steps: int,
    snapshot_at: float,
    evaluated_at: float,
) -> EvalReport:
    per_class = result.per_class_accuracy
    return EvalReport(
        task_id=task_id_for(manifest.name),
        version=version,
        split=EVAL_SPLIT,
        loss=result.loss,
        accuracy=result.accuracy,
        auc=None if math.isnan(result.auc) else result.auc,
        # A class absent from the test split has no accuracy; the report then has none.
        per_class_accuracy=() if any(math.isnan(a) for a in per_class) else per_class,
        num_examples=result.num_examples,
        updates_applied=steps,
        model_published_at=snapshot_at,
        evaluated_at=evaluated_at,
    )
