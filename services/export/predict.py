"""`fedmq predict`: classify image files with an exported model, file by file fault-tolerant.

The model is rebuilt from the zoo by its card and loaded from `model.safetensors`; images
go through `Preprocessing` (the training data's own conversion functions) and
`predict_logits` (the evaluator's inference path), so a prediction here equals the
evaluator's for the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from services.common.data.preprocessing import Preprocessing
from services.common.models import build_model
from services.common.training import predict_logits
from services.export.card import ModelCard, read_card
from services.export.images import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    DisplayImage,
    UnusableImage,
    is_dicom,
    read_image,
)

DEFAULT_BATCH_SIZE = 256
"""Files decoded and classified together: bounds memory on folders of any size."""


@dataclass(frozen=True)
class Predictor:
    """An exported model ready to classify: its card, the torch model, its preprocessing."""

    card: ModelCard
    model: nn.Module
    preprocessing: Preprocessing


@dataclass(frozen=True)
class Prediction:
    """One classified file."""

    path: Path
    label: str
    index: int
    probabilities: tuple[float, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    """One input that could not be classified, and why."""

    path: Path
    reason: str


@dataclass
class Outcome:
    """Everything `predict_paths` did, in input order."""

    predictions: list[Prediction] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def load_predictor(directory: Path) -> Predictor:
    """Read the card (checking the weights' hash) and load the weights into the zoo model."""
    from safetensors.torch import load_file

    card = read_card(directory)
    arch = card.architecture
    model = build_model(
        arch.name, num_classes=arch.num_classes, in_channels=arch.in_channels,
        image_size=arch.image_size,
    )  # fmt: skip
    model.load_state_dict(load_file(str(directory / card.weights.file)), strict=True)
    model.eval()
    return Predictor(card, model, Preprocessing.from_description(card.preprocessing))


def predict_paths(
    predictor: Predictor, inputs: Sequence[Path], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Outcome:
    """Classify every image file named or found in a named folder; failures are collected."""
    outcome = Outcome()
    files = list(_expand(inputs, outcome))
    for start in range(0, len(files), batch_size):
        _classify(predictor, files[start : start + batch_size], outcome, batch_size)
    return outcome


def _expand(inputs: Iterable[Path], outcome: Outcome) -> Iterator[Path]:
    for path in inputs:
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if _looks_like_image(p)]
            if not found:
                outcome.failures.append(Failure(path, "no PNG, JPEG or DICOM images in the folder"))
            yield from found
        elif path.is_file():
            yield path
        else:
            outcome.failures.append(Failure(path, "no such file or folder"))


def _looks_like_image(path: Path) -> bool:
    if not path.is_file() or any(part.startswith(".") for part in path.parts[-1:]):
        return False
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES or (not suffix and is_dicom(path))


def _classify(predictor: Predictor, files: list[Path], outcome: Outcome, batch_size: int) -> None:
    decoded: list[tuple[Path, DisplayImage]] = []
    for path in files:
        try:
            decoded.append((path, read_image(path, modalities=predictor.card.modalities)))
        except UnusableImage as error:
            outcome.failures.append(Failure(path, str(error)))
    if not decoded:
        return
    data = predictor.preprocessing.dataset([image.pixels for _, image in decoded])
    logits, _ = predict_logits(predictor.model, data, batch_size=batch_size)
    probabilities = torch.softmax(logits.double(), dim=1)
    names = predictor.card.class_names
    channels = predictor.card.architecture.in_channels
    indices = logits.argmax(1).tolist()  # as `evaluate` decides
    for (path, image), row, index in zip(decoded, probabilities.tolist(), indices, strict=True):
        notes = image.notes + _channel_note(image.channels, channels)
        outcome.predictions.append(Prediction(path, names[index], index, tuple(row), notes))


def _channel_note(have: int, want: int) -> tuple[str, ...]:
    if have == want:
        return ()
    if want == 1:
        return ("RGB image converted to greyscale (luma) for this 1-channel model",)
    return ("greyscale image repeated into 3 channels for this RGB model",)
