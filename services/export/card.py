"""The model card: `model_card.json`, what an exported model is and how to feed it.

Everything `fedmq predict` needs (architecture, classes, preprocessing) and everything a
reader needs to trust it (where it came from, its scores, DP, hashes) in one JSON file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
CARD_FORMAT = 1
HASH_CHUNK_BYTES = 1 << 20


class CardError(ValueError):
    """A model directory without a readable card, or whose files do not match it."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Architecture(_Frozen):
    """Which zoo model, adapted to which input and classes."""

    name: str
    num_classes: int = Field(ge=2)
    in_channels: int = Field(ge=1)
    image_size: int = Field(ge=8)
    parameters: int = Field(ge=0)
    defined_in: str = "services/common/models/zoo.py (fedmq model zoo, torchvision based)"


class Scores(_Frozen):
    """One split's scores as `evaluate` measures them."""

    split: str
    num_examples: int
    accuracy: float
    balanced_accuracy: float | None
    auc: float | None
    loss: float
    per_class_accuracy: list[float | None]


class Privacy(_Frozen):
    """Central DP of the training that produced the weights (user-level, see accounting)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    """Noisy versions up to this one: what `epsilon` composes (this model's own cost)."""
    published_steps: int
    """Noisy versions the task published in all (its privacy ledger), at least `steps`."""
    epsilon_all_published: float
    """epsilon over every published version: what an observer of all of them could learn."""
    accountant: str = "RDP (dp-accounting), Gaussian mechanism per version, no sampling (q = 1)"


class OnnxCheck(_Frozen):
    """The agreement of the ONNX graph with torch, measured at export on real images."""

    images: int
    split: str
    max_abs_logit_difference: float
    tolerance: float
    onnxruntime_version: str


class FileRef(_Frozen):
    """An artifact next to the card and its SHA-256."""

    file: str
    sha256: str
    format: str


class ModelCard(_Frozen):
    """The card's schema; unknown keys are refused so a typo cannot hide a field."""

    card_format: Literal[1] = 1
    fedmq_version: str
    created_at: str
    task_id: str
    source: Literal["federated", "centralized"]
    selection: str
    """`best-on-val` (the evaluator's selection), `latest` or `version` (asked for)."""
    version: int = Field(ge=0)
    updates_applied: int = Field(ge=0)
    contributing_sites: list[str] | None
    contributing_sites_note: str | None = None
    data_source: str
    class_names: list[str]
    architecture: Architecture
    preprocessing: dict[str, Any]
    modalities: list[str] | None
    """DICOM modalities the model is meant for (None: any); predict refuses others."""
    scores: dict[str, Scores]
    """Measured at export by `evaluate` on the data source's splits (`val`, `test`)."""
    recorded_scores: dict[str, Any] | None = None
    """What the evaluator recorded when it selected this version (best-on-val only)."""
    differential_privacy: Privacy | None
    weights: FileRef
    onnx: FileRef
    onnx_opset: int
    onnx_check: OnnxCheck
    inputs: dict[str, Any]
    outputs: dict[str, Any]


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_card(directory: Path, card: ModelCard) -> Path:
    """Write `model_card.json` (indented, keys in schema order)."""
    path = directory / CARD_FILE
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def read_card(directory: Path, *, verify: bool = True) -> ModelCard:
    """The card of an exported model; with `verify`, the weights must match its hash."""
    path = directory / CARD_FILE
    if not path.is_file():
        raise CardError(f"{directory} holds no {CARD_FILE}: is it the output of `fedmq export`?")
    try:
        card = ModelCard.model_validate_json(path.read_bytes())
    except ValueError as error:
        raise CardError(f"{path} is not a valid model card: {error}") from error
    weights = directory / card.weights.file
    if verify:
        if not weights.is_file():
            raise CardError(f"{weights} is missing")
        if sha256_of(weights) != card.weights.sha256:
            raise CardError(f"{weights} does not match the SHA-256 in {CARD_FILE}")
    return card
