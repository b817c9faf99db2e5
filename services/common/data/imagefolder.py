"""An institution's own images as class folders (`root/<class>/<image>`), decoded once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

from services.common.data.dataset import DatasetNotFound, ImageDataset, InvalidDatasetFile

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

_PIL_MODES = {1: "L", 3: "RGB"}


def load_image_folder(root: str | os.PathLike[str], *, channels: int, size: int) -> ImageDataset:
    """Decode every image under `root/<class name>/` into memory, `channels` x `size` x `size`.

    Class indices follow torchvision's `ImageFolder` (class folder names, sorted); the
    images are converted (greyscale "L" or "RGB") and resized once here, which suits
    the few thousand images an institution holds. Raises `DatasetNotFound` when `root`
    has no class folder with a readable image.
    """
    if channels not in _PIL_MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    folder = _scan(Path(root))
    images = np.stack([_decode(path, channels, size) for path, _ in folder.samples])
    labels = np.asarray(folder.targets, dtype=np.int64)
    return ImageDataset(images, labels, class_names=folder.classes)


def _scan(root: Path) -> ImageFolder:
    # Imported here: torchvision takes seconds to import and only folder sources need it.
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DatasetNotFound(f"image folder {root} does not exist or is not a directory")
    try:
        folder = ImageFolder(str(root))
    except FileNotFoundError as error:
        raise DatasetNotFound(
            f"no images found under {root}: expected {root}/<class name>/<image file> ({error})"
        ) from error
    if not folder.samples:
        raise DatasetNotFound(f"no images found under {root}/<class name>/")
    return folder


def _decode(path: str, channels: int, size: int) -> npt.NDArray[np.uint8]:
    try:
        with Image.open(path) as image:
            return convert_and_resize(image, channels, size)
    except OSError as error:
        raise InvalidDatasetFile(f"cannot decode image {path}: {error}") from error


def convert_and_resize(image: Image.Image, channels: int, size: int) -> npt.NDArray[np.uint8]:
    """PIL's conversion to "L"/"RGB" then PIL's bilinear resize: `(size, size, channels)` uint8.

    What image-folder sources do to every training image (and `fedmq predict` to its inputs).
    """
    converted = image.convert(_PIL_MODES[channels])
    resized = converted.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels if channels == 3 else pixels[:, :, None]
