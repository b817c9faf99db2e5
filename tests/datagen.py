"""Small generated datasets in the exact MedMNIST `.npz` layout, with a learnable signal.

Each class puts a bright Gaussian blob at its own place on a noisy background, so a
small CNN beats the majority rate within an epoch or two. `pneumonia_npz` hands tests
the real PneumoniaMNIST file bundled with fedmq.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.common.data.medmnist import bundled_path

REAL_PNEUMONIA = "pneumoniamnist.npz"

BINARY_PRIORS = (0.3, 0.7)
"""Class shares of generated binary data: the majority rate to beat is 0.7."""


def real_pneumonia_path() -> Path | None:
    """The real PneumoniaMNIST file bundled with fedmq (None only in a build without it)."""
    return bundled_path("pneumoniamnist")


def make_images(
    labels: npt.NDArray[np.int64],
    *,
    num_classes: int,
    size: int = 28,
    channels: int = 1,
    rng: np.random.Generator,
    blob_height: float = 110.0,
) -> npt.NDArray[np.uint8]:
    """uint8 `(N, size, size)` (or `(..., 3)`): noise plus a class-placed blob."""
    n = len(labels)
    grid = np.arange(size, dtype=np.float64)
    angle = 2 * np.pi * labels / num_classes + rng.normal(0, 0.15, n)
    radius = size * 0.28
    cy = size / 2 + radius * np.sin(angle) + rng.normal(0, 1.0, n)
    cx = size / 2 + radius * np.cos(angle) + rng.normal(0, 1.0, n)
    sigma = size / 9
    blob_y = np.exp(-((grid[None, :] - cy[:, None]) ** 2) / (2 * sigma**2))
    blob_x = np.exp(-((grid[None, :] - cx[:, None]) ** 2) / (2 * sigma**2))
    blob = blob_y[:, :, None] * blob_x[:, None, :]
    noise = rng.normal(90.0, 30.0, (n, size, size))
    pixels = np.clip(noise + blob_height * blob, 0, 255).astype(np.uint8)
    if channels == 3:
        return np.repeat(pixels[..., None], 3, axis=-1)
    return pixels


def make_medmnist_arrays(
    *,
    sizes: Sequence[int] = (600, 120, 120),
    num_classes: int = 2,
    priors: Sequence[float] | None = None,
    image_size: int = 28,
    channels: int = 1,
    seed: int = 0,
) -> dict[str, npt.NDArray[np.generic]]:
    """The arrays of a MedMNIST file: `{train,val,test}_{images,labels}`, labels `(N, 1)`."""
    rng = np.random.default_rng(seed)
    shares = np.asarray(priors if priors is not None else _default_priors(num_classes))
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for split, count in zip(("train", "val", "test"), sizes, strict=True):
        labels = rng.choice(num_classes, size=count, p=shares / shares.sum()).astype(np.uint8)
        images = make_images(
            labels.astype(np.int64), num_classes=num_classes, size=image_size,
            channels=channels, rng=rng,
        )  # fmt: skip
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels[:, None]
    return arrays


def write_medmnist_npz(path: Path, **options: Any) -> Path:
    """Write `make_medmnist_arrays(**options)` to `path` (compressed, like MedMNIST)."""
    return save_npz(path, make_medmnist_arrays(**options))


def save_npz(path: Path, arrays: Mapping[str, npt.NDArray[np.generic]]) -> Path:
    """Write `arrays` as a compressed `.npz` at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, allow_pickle=False, **arrays)
    return path


def pneumonia_npz(tmp_dir: Path) -> Path:
    """The real PneumoniaMNIST file if present, else a generated one in `tmp_dir`."""
    real = real_pneumonia_path()
    if real is not None:
        return real
    return write_medmnist_npz(Path(tmp_dir) / REAL_PNEUMONIA, sizes=(600, 120, 120))


def _default_priors(num_classes: int) -> tuple[float, ...]:
    if num_classes == 2:
        return BINARY_PRIORS
    return tuple(float(k + 1) for k in range(num_classes))
