"""How an 8-bit image becomes model input, described once and applied by the same code.

Training and evaluation convert images inside the data sources (`dataset.py` for MedMNIST
files, `imagefolder.py` for image folders). `Preprocessing` names which of the two a model
saw, describes it for the model card, and applies exactly those functions to new images,
so `fedmq predict` cannot drift from what the evaluator does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from services.common.data.dataset import ImageDataset, convert_channels, resize_images

Pipeline = Literal["tensor", "pil"]
"""`tensor`: torch conversions of `dataset.py` (MedMNIST); `pil`: PIL's (image folders)."""

NORMALISATION_MEAN = 0.5
NORMALISATION_STD = 0.5
"""`ImageDataset` items are `(x / 255 - 0.5) / 0.5`, i.e. `x / 127.5 - 1`, in [-1, 1]."""

_GREY_TO_RGB = "the grey channel repeated three times"


@dataclass(frozen=True)
class Preprocessing:
    """The conversion of a model's training data: channels, square size, which pipeline."""

    channels: int
    size: int
    pipeline: Pipeline

    def __post_init__(self) -> None:
        if self.channels not in (1, 3) or self.size < 1:
            raise ValueError(f"need 1 or 3 channels and a positive size, got {self}")
        if self.pipeline not in ("tensor", "pil"):
            raise ValueError(f"unknown preprocessing pipeline {self.pipeline!r}")

    @classmethod
    def for_source(cls, data_source: str, *, channels: int, size: int) -> Preprocessing:
        """What `load_site_dataset(data_source, channels=..., size=...)` does to images."""
        pipeline: Pipeline = "pil" if data_source.startswith("folder:") else "tensor"
        return cls(channels=channels, size=size, pipeline=pipeline)

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> Preprocessing:
        """Read back what `describe()` wrote (a model card's `preprocessing`)."""
        return cls(
            channels=int(description["channels"]),
            size=int(description["size"][0]),
            pipeline=description["pipeline"],
        )

    def describe(self) -> dict[str, Any]:
        """The exact steps, readable by a person and by `from_description`."""
        mean, std = [NORMALISATION_MEAN] * self.channels, [NORMALISATION_STD] * self.channels
        return {
            "pipeline": self.pipeline,
            "input": "an 8-bit image: greyscale (H, W) or RGB (H, W, 3), values 0..255",
            "channels": self.channels,
            "size": [self.size, self.size],
            "steps": [
                self._channel_step(),
                self._resize_step(),
                {"op": "scale", "formula": "x / 255"},
                {
                    "op": "normalize",
                    "mean": mean,
                    "std": std,
                    "formula": "(x / 255 - 0.5) / 0.5 = x / 127.5 - 1, in [-1, 1]",
                },
            ],
            "layout": f"float32 NCHW (batch, {self.channels}, {self.size}, {self.size})",
            "output": "logits (batch, classes); softmax over classes gives probabilities",
        }

    def _channel_step(self) -> dict[str, Any]:
        if self.pipeline == "pil":
            return {
                "op": "channels",
                "to": self.channels,
                "method": f'PIL Image.convert("{"L" if self.channels == 1 else "RGB"}")',
                "rgb_to_grey": "PIL's ITU-R 601-2 luma: L = R*299/1000 + G*587/1000 + B*114/1000",
                "grey_to_rgb": _GREY_TO_RGB,
            }
        return {
            "op": "channels",
            "to": self.channels,
            "method": "fedmq convert_channels (torch)",
            "rgb_to_grey": "round(0.299 R + 0.587 G + 0.114 B) in float32, clamped to 0..255",
            "grey_to_rgb": _GREY_TO_RGB,
        }

    def _resize_step(self) -> dict[str, Any]:
        if self.pipeline == "pil":
            return {
                "op": "resize",
                "size": [self.size, self.size],
                "method": "PIL Image.resize(Resampling.BILINEAR), always applied",
            }
        return {
            "op": "resize",
            "size": [self.size, self.size],
            "method": "torch.nn.functional.interpolate(mode='bilinear', align_corners=False,"
            " antialias=True) on float32, then round and clamp to uint8",
            "skipped_when": f"the image is already {self.size} x {self.size}",
        }

    def dataset(self, images: Sequence[npt.NDArray[np.uint8]]) -> ImageDataset:
        """New 8-bit images (`(H, W)` or `(H, W, 3)`, any size) as model input, unlabelled.

        Items are what the model saw in training and evaluation, by the same functions.
        """
        if not images:
            raise ValueError("no images to preprocess")
        converted = [self._convert(image) for image in images]
        labels = np.zeros(len(converted), dtype=np.int64)
        return ImageDataset(torch.cat(converted), labels)

    def _convert(self, image: npt.NDArray[np.uint8]) -> torch.Tensor:
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"expected an 8-bit (H, W) or (H, W, 3) image, got {image.shape}")
        if self.pipeline == "pil":
            from PIL import Image

            from services.common.data.imagefolder import convert_and_resize

            pixels = convert_and_resize(Image.fromarray(image), self.channels, self.size)
            return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).unsqueeze(0).contiguous()
        tensor = torch.from_numpy(np.array(image))  # a copy: decoded images may be read-only
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return resize_images(convert_channels(tensor.unsqueeze(0), self.channels), self.size)
