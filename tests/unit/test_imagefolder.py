"""Image folders (`root/<class>/<image>`) decoded once into an `ImageDataset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.data import DatasetNotFound, load_image_folder, load_site_dataset


def _write_folder(root: Path, counts: dict[str, int], *, mode: str = "L") -> Path:
    """PNGs of assorted sizes; pixel value encodes the class (normal dark, pneumonia bright)."""
    for index, (name, count) in enumerate(sorted(counts.items())):
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(count):
            side = 20 + 7 * k  # images of different sizes, resized on load
            colour = (40 + 160 * index,) * (3 if mode == "RGB" else 1)
            Image.new(mode, (side, side + 3), colour).save(folder / f"{k}.png")
    return root


def test_class_folders_become_labels_and_class_names(tmp_path: Path) -> None:
    # Given two class folders of greyscale PNGs of different sizes
    root = _write_folder(tmp_path / "xrays", {"normal": 3, "pneumonia": 5})

    # When decoded at 28 x 28, one channel
    dataset = load_image_folder(root, channels=1, size=28)

    # Then labels follow the sorted folder names and every image was resized
    assert dataset.class_names == ("normal", "pneumonia")
    assert dataset.class_counts().tolist() == [3, 5]
    assert dataset.pixels.shape == (8, 1, 28, 28)
    normal = dataset.pixels[torch.from_numpy(dataset.labels == 0)]
    pneumonia = dataset.pixels[torch.from_numpy(dataset.labels == 1)]
    assert bool((normal == 40).all()) and bool((pneumonia == 200).all())


def test_greyscale_images_are_decoded_as_rgb_when_three_channels_are_asked(
    tmp_path: Path,
) -> None:
    root = _write_folder(tmp_path / "xrays", {"a": 2, "b": 2})

    dataset = load_image_folder(root, channels=3, size=16)

    image, label = dataset[3]
    assert image.shape == (3, 16, 16) and label == 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_rgb_images_are_decoded_as_grey_when_one_channel_is_asked(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", {"a": 1, "b": 1}, mode="RGB")

    dataset = load_image_folder(root, channels=1, size=10)

    assert dataset.pixels.shape == (2, 1, 10, 10)
    assert np.unique(dataset.pixels[1].numpy()).tolist() == [200]


def test_a_missing_folder_is_reported_as_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="does not exist"):
        load_image_folder(tmp_path / "absent", channels=1, size=28)


def test_a_folder_without_images_is_reported_naming_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "empty" / "normal").mkdir(parents=True)

    with pytest.raises(DatasetNotFound, match="<class name>"):
        load_image_folder(tmp_path / "empty", channels=1, size=28)


def test_folder_source_uses_the_split_subfolder_when_there_is_one(tmp_path: Path) -> None:
    _write_folder(tmp_path / "site" / "train", {"normal": 4, "pneumonia": 2})
    _write_folder(tmp_path / "site" / "test", {"normal": 1, "pneumonia": 1})

    train = load_site_dataset(f"folder:{tmp_path / 'site'}", split="train", channels=1, size=28)
    test = load_site_dataset(f"folder:{tmp_path / 'site'}", split="test", channels=1, size=28)

    assert (len(train), len(test)) == (6, 2)
    assert train.class_names == test.class_names == ("normal", "pneumonia")
