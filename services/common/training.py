"""Local training and evaluation of one model on one site's data (no transport, no threads).

Nothing here changes global thread counts: the process that calls decides
(`torch.set_num_threads`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from services.common.optimizers import SGD, Adam, LocalOptimizer

Batch = tuple[torch.Tensor, torch.Tensor]
LabelledImages = Dataset[tuple[torch.Tensor, int]]

PAUSE_SLICE_S = 0.05
"""A simulated straggler pause sleeps in slices this long, so `should_stop` stays prompt."""

EVAL_BATCH_SIZE = 256


def never() -> bool:
    """The default `should_stop`: training always runs to the end."""
    return False


@dataclass(frozen=True)
class TrainConfig:
    """How a site trains locally for one round."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    logit_adjustment: float = 0.0
    """tau of the logit-adjusted loss (Menon et al. 2021): cross-entropy of
    `logits + tau * log(class prior of this dataset)`. The model then learns scores free of
    the local label mix, which under label skew differs from site to site; 0 = plain loss."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.logit_adjustment < 0:
            raise ValueError(f"logit_adjustment must be >= 0, got {self.logit_adjustment}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.momentum < 1):
            raise ValueError("need lr > 0, weight_decay >= 0 and 0 <= momentum < 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


@dataclass(frozen=True)
class TrainResult:
    """What one call of `train_local` did.

    `num_examples` is the size of the local dataset (the FedAvg weight); `examples_seen`
    counts examples actually processed over all epochs. `mean_loss` is the example-weighted
    mean training loss over those, NaN when no batch ran.
    """

    mean_loss: float
    num_examples: int
    steps: int
    seconds: float
    stopped_early: bool
    examples_seen: int


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on a labelled dataset (NaN where a metric is undefined)."""

    loss: float
    accuracy: float
    auc: float
    per_class_accuracy: tuple[float, ...]
    num_examples: int


@dataclass
class _Progress:
    loss_sum: float = 0.0
    seen: int = 0
    steps: int = 0
    stopped: bool = False


class LogitAdjustment:
    """The logit-adjusted loss: cross-entropy of `logits + tau * log(class prior)`.

    The prior is the training data's own label mix, add-one smoothed so that a class a
    site never saw gets a finite (very negative) offset instead of -inf.
    """

    def __init__(self, class_counts: npt.NDArray[np.int64], tau: float) -> None:
        self._counts = np.asarray(class_counts, dtype=np.float64)
        self.tau = tau
        self._offset: torch.Tensor | None = None

    @classmethod
    def of(cls, dataset: LabelledImages, tau: float) -> LogitAdjustment | None:
        """The adjustment for training on `dataset`; None when `tau` is 0 (plain loss)."""
        return cls(class_counts(dataset), tau) if tau > 0 else None

    def offset(self, classes: int, device: torch.device) -> torch.Tensor:
        """`tau * log(prior)` for a model with `classes` outputs."""
        if self._offset is None or self._offset.shape[0] != classes:
            counts = np.zeros(classes, dtype=np.float64)
            known = self._counts[:classes]
            counts[: len(known)] = known
            prior = (counts + 1.0) / (counts.sum() + classes)
            self._offset = torch.tensor(self.tau * np.log(prior), dtype=torch.float32)
        return self._offset.to(device)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, adjustment: LogitAdjustment | None = None
) -> torch.Tensor:
    """Mean cross-entropy, logit-adjusted when `adjustment` is given."""
    if adjustment is not None:
        logits = logits + adjustment.offset(int(logits.shape[1]), logits.device)
    return F.cross_entropy(logits, labels)


def train_local(
    model: nn.Module,
    dataset: LabelledImages,
    config: TrainConfig,
    *,
    should_stop: Callable[[], bool] = never,
    slowdown: float = 1.0,
) -> TrainResult:
    """Train `model` in place for `config.epochs` epochs of cross-entropy on `dataset`.

    Deterministic for a given `config.seed` (shuffle order via a seeded `torch.Generator`,
    dropout via a forked, seeded torch RNG). `should_stop` is polled before every batch.
    `slowdown` is a SIMULATION AID for straggler experiments: with `slowdown > 1`, after
    each batch the call sleeps `(slowdown - 1) x` that batch's compute time, so a fast
    machine behaves like a slower site. Leave it at 1.0 for real training.
    """
    if slowdown < 1.0:
        raise ValueError(f"slowdown must be >= 1.0, got {slowdown}")
    size = _length(dataset)
    if size == 0:
        raise ValueError("cannot train on an empty dataset")
    device = _device_of(model)
    loader = _train_loader(dataset, config, size)
    optimizer = build_optimizer(model, config)
    adjustment = LogitAdjustment.of(dataset, config.logit_adjustment)
    progress = _Progress()
    started = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(config.seed)
        for _ in range(config.epochs):
            _run_epoch(
                model, loader, optimizer, device, progress, should_stop, slowdown, adjustment
            )
            if progress.stopped:
                break
    return TrainResult(
        mean_loss=progress.loss_sum / progress.seen if progress.seen else math.nan,
        num_examples=size,
        steps=progress.steps,
        seconds=time.perf_counter() - started,
        stopped_early=progress.stopped,
        examples_seen=progress.seen,
    )


def _run_epoch(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, int]],
    optimizer: LocalOptimizer,
    device: torch.device,
    progress: _Progress,
    should_stop: Callable[[], bool],
    slowdown: float,
    adjustment: LogitAdjustment | None,
) -> None:
    for images, labels in loader:
        if should_stop():
            progress.stopped = True
            return
        tick = time.perf_counter()
        loss = train_step(model, optimizer, images.to(device), labels.to(device), adjustment)
        progress.loss_sum += loss * len(labels)
        progress.seen += len(labels)
        progress.steps += 1
        if slowdown > 1.0:
            _pause((slowdown - 1.0) * (time.perf_counter() - tick), should_stop)


def train_step(
    model: nn.Module,
    optimizer: LocalOptimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    adjustment: LogitAdjustment | None = None,
) -> float:
    """One optimizer step on one batch; returns the batch's loss."""
    optimizer.zero_grad()
    loss = classification_loss(model(images), labels, adjustment)
    torch.autograd.backward(loss)
    optimizer.step()
    return float(loss.detach())


def _pause(seconds: float, should_stop: Callable[[], bool]) -> None:
    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0 and not should_stop():
        time.sleep(min(left, PAUSE_SLICE_S))


def build_optimizer(model: nn.Module, config: TrainConfig) -> LocalOptimizer:
    """A fresh optimiser over the model's trainable parameters, as `config` says.

    fedmq's own SGD and Adam (services/common/optimizers.py): the same arithmetic as
    torch.optim's, without the seconds of `torch._dynamo` import on first use.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def class_counts(dataset: LabelledImages) -> npt.NDArray[np.int64]:
    """Examples per label; datasets with a `labels` vector (all of fedmq's) answer at once."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(_length(dataset))]
    return np.bincount(np.asarray(labels, dtype=np.int64))


def _train_loader(
    dataset: LabelledImages, config: TrainConfig, size: int
) -> DataLoader[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(config.seed)
    # A trailing batch of one breaks BatchNorm in train mode; drop it (one example per epoch).
    drop_last = size > 1 and size % config.batch_size == 1
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
        drop_last=drop_last, num_workers=0,
    )  # fmt: skip


def evaluate(
    model: nn.Module, dataset: LabelledImages, *, batch_size: int = EVAL_BATCH_SIZE
) -> EvalResult:
    """Loss, accuracy, ROC AUC and per-class accuracy (recall) of `model` on `dataset`.

    AUC is binary ROC AUC of the positive-class probability for two classes, macro
    one-vs-rest otherwise. The model's train/eval mode is restored afterwards.
    """
    if _length(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    logits, labels = predict_logits(model, dataset, batch_size=batch_size)
    num_classes = int(logits.shape[1])
    loss = float(F.cross_entropy(logits, labels).item())
    y = labels.numpy()
    predicted = logits.argmax(1).numpy()
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    return EvalResult(
        loss=loss,
        accuracy=float(np.mean(predicted == y)),
        auc=multiclass_auc(probabilities, y),
        per_class_accuracy=tuple(_recall(predicted, y, c) for c in range(num_classes)),
        num_examples=len(y),
    )


def predict_logits(
    model: nn.Module, dataset: LabelledImages, *, batch_size: int = EVAL_BATCH_SIZE
) -> Batch:
    """`(logits (N, K) float32, labels (N,))` of `model` in eval mode, in dataset order.

    The one inference path: `evaluate` scores with it and `fedmq predict` classifies with it.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        with torch.inference_mode():
            for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                outputs.append(model(images.to(device)).detach().float().cpu())
                targets.append(labels)
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(targets).long()


def _recall(predicted: npt.NDArray[np.int64], labels: npt.NDArray[np.int64], cls: int) -> float:
    members = labels == cls
    return float(np.mean(predicted[members] == cls)) if members.any() else math.nan


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Binary ROC AUC via the Mann-Whitney rank statistic, tied scores sharing their mean rank.

    `labels` are truthy for positives. NaN when either class is absent.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != positive.shape:
        raise ValueError(f"{s.size} scores but {positive.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based ranks; a tie group occupying ranks a..b gets (a + b) / 2.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(mean_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def multiclass_auc(probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """ROC AUC of `(N, K)` class scores: K = 2 uses column 1; K > 2 is macro one-vs-rest.

    Classes absent from `labels` (or present in all of them) are left out of the macro
    mean; NaN when no class is left.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"scores {p.shape} do not match {y.size} labels")
    if p.shape[1] == 2:
        return roc_auc(p[:, 1], y == 1)
    per_class = [roc_auc(p[:, c], y == c) for c in range(p.shape[1])]
    defined = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(defined)) if defined else math.nan


def _length(dataset: LabelledImages) -> int:
    if not isinstance(dataset, Sized):
        raise TypeError("the dataset must have a length")
    return len(dataset)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
