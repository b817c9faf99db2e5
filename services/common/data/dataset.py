"""In-memory labelled image dataset (tensorised once) and the data-loading errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

FLOAT_CACHE_LIMIT_BYTES = 256 * 1024 * 1024
"""Above this size images stay uint8 (4x smaller) and are scaled per item instead of once."""

RESIZE_CHUNK = 1024
"""Images resized per `interpolate` call: bounds the float32 scratch memory of a resize."""

# ITU-R 601-2 luma, the weights PIL uses for "RGB" -> "L".
_LUMA = (0.299, 0.587, 0.114)


class DatasetError(Exception):
    """Base class of every error raised while locating or reading a dataset."""


class DatasetNotFound(DatasetError):
    """The dataset is not on disk and could not be fetched; the message says where to put it."""


class InvalidDatasetFile(DatasetError, ValueError):
    """A dataset file exists but does not have the expected layout (keys, shapes, dtypes)."""


class ChecksumMismatch(DatasetError):
    """A downloaded file did not match its published checksum; nothing was saved."""


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Labelled images held in memory as one tensor.

    `images` are uint8, `(N, H, W)` (greyscale) or `(N, H, W, C)` / `(N, C, H, W)` with
    C in {1, 3}; `labels` are integers `(N,)` or `(N, 1)`. Items are
    `(float32 C x H x W normalised to mean 0.5 / std 0.5, i.e. in [-1, 1], int label)`.
    `channels` and `size` convert once at construction (grey -> RGB by repetition,
    RGB -> grey by luma; bilinear resize to `size x size`). Item tensors may be views of
    a shared cache: copy before modifying one in place.
    """

    def __init__(
        self,
        images: npt.NDArray[np.uint8] | torch.Tensor,
        labels: npt.ArrayLike,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        channels: int | None = None,
        size: int | None = None,
    ) -> None:
        pixels = _to_nchw_uint8(images)
        label_array = _as_label_vector(labels, len(pixels))
        self.num_classes = _resolve_num_classes(label_array, num_classes, class_names)
        self.class_names: tuple[str, ...] = (
            tuple(class_names)
            if class_names is not None
            else tuple(str(i) for i in range(self.num_classes))
        )
        pixels = convert_channels(pixels, channels) if channels is not None else pixels
        pixels = resize_images(pixels, size) if size is not None else pixels
        self._init_storage(pixels, label_array)

    def _init_storage(self, pixels: torch.Tensor, labels: npt.NDArray[np.int64]) -> None:
        self._pixels = pixels
        self._labels = labels
        self._labels.flags.writeable = False
        self._label_list: list[int] = labels.tolist()
        float_bytes = pixels.numel() * 4
        self._normalised = _normalise(pixels) if float_bytes <= FLOAT_CACHE_LIMIT_BYTES else None

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._normalised is not None:
            return self._normalised[index], self._label_list[index]
        return _normalise(self._pixels[index]), self._label_list[index]

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        """Read-only int64 label vector `(N,)`."""
        return self._labels

    @property
    def channels(self) -> int:
        """Channels of every item (1 or 3)."""
        return int(self._pixels.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` of every item."""
        return int(self._pixels.shape[2]), int(self._pixels.shape[3])

    @property
    def pixels(self) -> torch.Tensor:
        """The stored uint8 `(N, C, H, W)` tensor (do not modify)."""
        return self._pixels

    def class_counts(self) -> npt.NDArray[np.int64]:
        """Examples per class, length `num_classes`."""
        return np.bincount(self._labels, minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: npt.ArrayLike) -> ImageDataset:
        """The examples at `indices` (same classes and names; pixels are copied)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"subset indices out of range for a dataset of {len(self)}")
        return self._derive(self._pixels[torch.from_numpy(index)], self._labels[index])

    def converted(self, *, channels: int | None = None, size: int | None = None) -> ImageDataset:
        """This dataset with `channels` / `size x size` items (self when nothing changes)."""
        pixels = convert_channels(self._pixels, channels) if channels is not None else self._pixels
        pixels = resize_images(pixels, size) if size is not None else pixels
        return self if pixels is self._pixels else self._derive(pixels, self._labels)

    def _derive(self, pixels: torch.Tensor, labels: npt.NDArray[np.int64]) -> ImageDataset:
        derived = ImageDataset.__new__(ImageDataset)
        derived.num_classes = self.num_classes
        derived.class_names = self.class_names
        derived._init_storage(pixels, labels.copy())
        return derived


def convert_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """`(N, C, H, W)` uint8 to `channels` (1 or 3): grey is repeated, RGB becomes luma."""
    have = int(pixels.shape[1])
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if have == channels:
        return pixels
    if have == 1:
        return pixels.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    grey = torch.cat(
        [
            (chunk.float() * weights).sum(1, keepdim=True)
            for chunk in torch.split(pixels, RESIZE_CHUNK)
        ]
    )
    return grey.round_().clamp_(0, 255).to(torch.uint8)


def resize_images(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """`(N, C, H, W)` uint8 resized to `size x size` (bilinear, antialiased when shrinking)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if tuple(pixels.shape[2:]) == (size, size):
        return pixels
    chunks = [
        F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for chunk in torch.split(pixels, RESIZE_CHUNK)
    ]
    if not chunks:
        return torch.empty((0, pixels.shape[1], size, size), dtype=torch.uint8)
    return torch.cat(chunks)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    # (x / 255 - 0.5) / 0.5 == x / 127.5 - 1
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


def _to_nchw_uint8(images: npt.NDArray[np.uint8] | torch.Tensor) -> torch.Tensor:
    tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if tensor.dtype != torch.uint8:
        raise InvalidDatasetFile(f"images must be uint8, got {tensor.dtype}")
    if tensor.ndim == 3:
        return tensor.unsqueeze(1).contiguous()
    if tensor.ndim == 4 and tensor.shape[-1] in (1, 3):
        return tensor.permute(0, 3, 1, 2).contiguous()
    if tensor.ndim == 4 and tensor.shape[1] in (1, 3):
        return tensor.contiguous()
    raise InvalidDatasetFile(
        f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {{1, 3}}, "
        f"got shape {tuple(tensor.shape)}"
    )


def _as_label_vector(labels: npt.ArrayLike, count: int) -> npt.NDArray[np.int64]:
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise InvalidDatasetFile(
            f"labels must be (N,) or (N, 1) single-label class indices, got shape {array.shape}"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidDatasetFile(f"labels must be integers, got {array.dtype}")
    if len(array) != count:
        raise InvalidDatasetFile(f"{count} images but {len(array)} labels")
    if array.size and array.min() < 0:
        raise InvalidDatasetFile("labels must be non-negative class indices")
    return array.astype(np.int64)


def _resolve_num_classes(
    labels: npt.NDArray[np.int64], num_classes: int | None, class_names: Sequence[str] | None
) -> int:
    seen = int(labels.max()) + 1 if labels.size else 0
    resolved = (
        num_classes
        if num_classes is not None
        else (len(class_names) if class_names is not None else max(seen, 1))
    )
    if class_names is not None and len(class_names) != resolved:
        raise ValueError(f"{len(class_names)} class names for {resolved} classes")
    if seen > resolved:
        raise InvalidDatasetFile(f"label {seen - 1} is out of range for {resolved} classes")
    return resolved
