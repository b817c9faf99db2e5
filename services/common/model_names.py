"""Names of the model zoo's models, importable without torch (for flag choices and help)."""

from __future__ import annotations

from typing import Final

MODEL_NAMES: Final = (
    "cnn-small",
    "cnn-small-gn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "resnet18",
)
"""Kept equal to `services.common.models.available_models()` by a unit test."""
