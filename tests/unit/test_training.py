"""Local training and evaluation: learning, determinism, early stop, slowdown, metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from services.common import training
from services.common.data import ImageDataset, load_medmnist
from services.common.models import build_model
from services.common.training import (
    LogitAdjustment,
    TrainConfig,
    classification_loss,
    evaluate,
    multiclass_auc,
    roc_auc,
    train_local,
)
from tests.datagen import write_medmnist_npz


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core box, 2 OpenMP threads spin and run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageDataset, ImageDataset]:
    root: Path = tmp_path_factory.mktemp("data")
    write_medmnist_npz(root / "genmnist.npz", sizes=(320, 20, 200), seed=3)
    train = load_medmnist("genmnist", "train", data_dir=root, download=False)
    test = load_medmnist("genmnist", "test", data_dir=root, download=False)
    return train, test


class _ConstantLogits(nn.Module):
    """Predicts the same logits for every image."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def _cnn() -> nn.Module:
    return build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=0)


def test_training_lowers_the_loss_and_beats_the_majority_rate(
    generated: tuple[ImageDataset, ImageDataset],
) -> None:
    # Given an untrained small CNN and imbalanced data (majority about 70%)
    train, test = generated
    model = _cnn()
    before = evaluate(model, test)
    majority = test.class_counts().max() / len(test)

    # When it trains for two epochs
    result = train_local(model, train, TrainConfig(epochs=2, lr=0.05, seed=1))

    # Then the held-out loss fell and accuracy is clearly above always guessing the majority
    after = evaluate(model, test)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > majority + 0.1
    assert after.auc > 0.9
    assert (result.num_examples, result.steps, result.examples_seen) == (320, 20, 640)
    assert not result.stopped_early and math.isfinite(result.mean_loss)


def test_training_is_deterministic_for_a_seed(
    generated: tuple[ImageDataset, ImageDataset],
) -> None:
    train = generated[0].subset(range(64))
    config = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, seed=9)
    a, b, c = _cnn(), _cnn(), _cnn()

    train_local(a, train, config)
    train_local(b, train, config)
    train_local(c, train, TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, seed=10))

    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["classifier.1.weight"], sc["classifier.1.weight"])


def test_should_stop_ends_training_between_batches(
    generated: tuple[ImageDataset, ImageDataset],
) -> None:
    polls = 0

    def stop_on_third_poll() -> bool:
        nonlocal polls
        polls += 1
        return polls >= 3

    result = train_local(
        _cnn(), generated[0], TrainConfig(epochs=3, batch_size=32), should_stop=stop_on_third_poll
    )

    assert result.stopped_early
    assert (result.steps, result.examples_seen) == (2, 64)


def test_slowdown_pauses_after_each_batch_in_proportion_to_its_compute_time(
    generated: tuple[ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(training, "_pause", lambda seconds, should_stop: pauses.append(seconds))
    train = generated[0].subset(range(64))

    train_local(_cnn(), train, TrainConfig(batch_size=16), slowdown=1.0)
    assert pauses == []
    result = train_local(_cnn(), train, TrainConfig(batch_size=16), slowdown=3.0)

    assert len(pauses) == result.steps == 4
    assert all(p > 0 for p in pauses)
    assert sum(pauses) < 2.0 * result.seconds


def test_a_slowdown_below_one_is_rejected(generated: tuple[ImageDataset, ImageDataset]) -> None:
    with pytest.raises(ValueError, match="slowdown"):
        train_local(_cnn(), generated[0], TrainConfig(), slowdown=0.5)


def test_a_trailing_batch_of_one_is_dropped_so_batchnorm_can_train(
    generated: tuple[ImageDataset, ImageDataset],
) -> None:
    result = train_local(_cnn(), generated[0].subset(range(33)), TrainConfig(batch_size=32))

    assert (result.steps, result.examples_seen) == (1, 32)


def test_train_config_rejects_an_unknown_optimizer() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]


def test_evaluate_reports_exact_metrics_for_a_constant_predictor() -> None:
    # Given a model that always favours class 1 by one logit, on 1 normal and 3 pneumonia
    dataset = ImageDataset(np.zeros((4, 8, 8), dtype=np.uint8), np.array([0, 1, 1, 1]))
    model = _ConstantLogits([0.0, 1.0])
    model.train()

    # When it is evaluated
    result = evaluate(model, dataset, batch_size=3)

    # Then loss is the mean cross-entropy, class 0 is never right, AUC is chance (all tied)
    expected_loss = (math.log1p(math.e) + 3 * math.log1p(math.exp(-1.0))) / 4
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert result.accuracy == 0.75
    assert result.per_class_accuracy == (0.0, 1.0)
    assert result.auc == 0.5
    assert result.num_examples == 4
    assert model.training


def test_evaluate_marks_per_class_accuracy_of_absent_classes_as_nan() -> None:
    dataset = ImageDataset(np.zeros((2, 8, 8), dtype=np.uint8), np.array([0, 0]), num_classes=3)

    result = evaluate(_ConstantLogits([2.0, 1.0, 0.0]), dataset)

    assert result.per_class_accuracy[0] == 1.0
    assert math.isnan(result.per_class_accuracy[1]) and math.isnan(result.per_class_accuracy[2])
    assert math.isnan(result.auc)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of 4 pos/neg pairs ordered
        ([0.2, 0.3, 0.7, 0.9], [0, 0, 1, 1], 1.0),
        ([0.9, 0.7, 0.3, 0.2], [0, 0, 1, 1], 0.0),
        ([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1], 0.75),  # tie 0.5 vs 0.5 counts a half, twice
        ([0.3, 0.3, 0.3], [1, 0, 0], 0.5),
        ([1.0, 2.0, 2.0, 3.0, 3.0], [0, 1, 0, 1, 0], 4.0 / 6.0),  # 1 + .5 + 1 + 1 + .5 of 6
    ],
)
def test_roc_auc_matches_hand_computed_values(
    scores: list[float], labels: list[int], expected: float
) -> None:
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_is_nan_when_one_class_is_missing() -> None:
    assert math.isnan(roc_auc([0.1, 0.9], [1, 1]))


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 5).map(float), st.booleans()), min_size=2, max_size=40)
)
def test_roc_auc_equals_the_pairwise_count_with_ties_as_halves(
    pairs: list[tuple[float, bool]],
) -> None:
    scores = np.array([s for s, _ in pairs])
    positive = np.array([p for _, p in pairs])
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()

    assert roc_auc(scores, positive) == pytest.approx(wins / (len(pos) * len(neg)))


def test_multiclass_auc_is_the_macro_mean_of_one_vs_rest() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    labels = np.array([0, 1, 1, 2])
    # class 0: pos {.7} vs neg {.2,.6,.1} -> 1; class 1: pos {.5,.3} vs neg {.2,.3}
    # -> (1 + 1 + 1 + .5) / 4 = .875; class 2: pos {.6} vs {.1,.3,.1} -> 1
    expected = (1.0 + 0.875 + 1.0) / 3

    assert multiclass_auc(probabilities, labels) == pytest.approx(expected)


def _three_to_one(size: int = 64) -> ImageDataset:
    labels = np.array([1, 1, 1, 0] * (size // 4))
    return ImageDataset(np.zeros((size, 8, 8), dtype=np.uint8), labels)


def _constant_logits_after_training(tau: float) -> torch.Tensor:
    model = _ConstantLogits([0.0, 0.0])
    config = TrainConfig(epochs=60, batch_size=64, lr=0.5, momentum=0.0, logit_adjustment=tau)
    train_local(model, _three_to_one(), config)
    return model.logits.detach()


def test_plain_loss_learns_the_local_label_mix_into_the_logits() -> None:
    logits = _constant_logits_after_training(0.0)
    assert float(logits[1] - logits[0]) == pytest.approx(math.log(3), abs=0.05)


def test_logit_adjusted_loss_learns_scores_free_of_the_local_label_mix() -> None:
    # The prior (48+1)/(64+2) vs (16+1)/(64+2) is in the loss, so the logits stay balanced
    logits = _constant_logits_after_training(1.0)
    assert float(logits[1] - logits[0]) == pytest.approx(math.log(17 / 49) + math.log(3), abs=0.05)
    assert abs(float(logits[1] - logits[0])) < 0.05


def test_a_class_a_site_never_saw_gets_a_finite_offset() -> None:
    adjustment = LogitAdjustment(np.array([10, 0]), tau=1.0)
    offset = adjustment.offset(3, torch.device("cpu"))
    assert torch.isfinite(offset).all()
    expected = np.log(np.array([11, 1, 1]) / 13)
    np.testing.assert_allclose(offset.numpy(), expected, rtol=1e-6)


def test_without_an_adjustment_the_loss_is_plain_cross_entropy() -> None:
    logits, labels = torch.tensor([[0.3, -1.0], [2.0, 0.5]]), torch.tensor([1, 0])
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.equal(classification_loss(logits, labels), expected)
    assert LogitAdjustment.of(_three_to_one(), 0.0) is None


def test_a_negative_logit_adjustment_is_refused() -> None:
    with pytest.raises(ValueError, match="logit_adjustment"):
        TrainConfig(logit_adjustment=-1.0)
