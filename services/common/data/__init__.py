"""Data sources of a site: MedMNIST files, image folders, and simulated partitions of either."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.data.dataset import (
    ChecksumMismatch,
    DatasetError,
    DatasetNotFound,
    ImageDataset,
    InvalidDatasetFile,
)
from services.common.data.imagefolder import load_image_folder
from services.common.data.medmnist import (
    MEDMNIST_FILES,
    SPLITS,
    default_data_dir,
    load_medmnist,
    medmnist_path,
)
from services.common.data.partition import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_SITE_SIZE,
    DEFAULT_SHARDS_PER_SITE,
    SCHEMES,
    SiteSummary,
    describe,
    format_partition_table,
    partition,
)

__all__ = [
    "MEDMNIST_FILES",
    "SCHEMES",
    "SPLITS",
    "ChecksumMismatch",
    "DatasetError",
    "DatasetNotFound",
    "ImageDataset",
    "InvalidDatasetFile",
    "SiteSummary",
    "default_data_dir",
    "describe",
    "format_partition_table",
    "load_dataset",
    "load_image_folder",
    "load_medmnist",
    "load_site_dataset",
    "medmnist_path",
    "partition",
]

MEDMNIST_PREFIX = "medmnist:"
FOLDER_PREFIX = "folder:"
DEFAULT_FOLDER_IMAGE_SIZE = 28
"""Image folders hold images of any size; without `size` they are decoded at 28 x 28."""


def load_dataset(
    source: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    channels: int | None = None,
    size: int | None = None,
    download: bool = True,
) -> ImageDataset:
    """One whole split of `medmnist:<name>` or `folder:<path>`, converted to channels/size.

    For a folder, `<path>/<split>/` is used when it exists, else `<path>` itself (an
    institution's folder is simply its data).
    """
    if source.startswith(MEDMNIST_PREFIX):
        name = source.removeprefix(MEDMNIST_PREFIX)
        dataset = load_medmnist(name, split, data_dir=data_dir, download=download)
        return dataset.converted(channels=channels, size=size)
    if source.startswith(FOLDER_PREFIX):
        root = Path(source.removeprefix(FOLDER_PREFIX)).expanduser()
        folder = root / split if (root / split).is_dir() else root
        return load_image_folder(
            folder, channels=channels or 1, size=size or DEFAULT_FOLDER_IMAGE_SIZE
        )
    raise ValueError(
        f"unknown data source {source!r}: use {MEDMNIST_PREFIX}<name> or {FOLDER_PREFIX}<path>"
    )


def load_site_dataset(
    source: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    site: int | None = None,
    num_sites: int = 1,
    scheme: str = "iid",
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    channels: int | None = None,
    size: int | None = None,
    shards_per_site: int = DEFAULT_SHARDS_PER_SITE,
    min_size: int = DEFAULT_MIN_SITE_SIZE,
    download: bool = True,
) -> ImageDataset:
    """The data one site trains or evaluates on.

    With `site` set, the train split is partitioned over `num_sites` by `scheme` (the same
    deterministic partition on every machine for the same `seed`) and site `site`'s part
    is returned. Val and test splits are never partitioned: they are held-out data.
    """
    # Partition at the native size, then convert only this site's images.
    dataset = load_dataset(
        source, split=split, data_dir=data_dir, download=download,
        channels=None if source.startswith(MEDMNIST_PREFIX) else channels,
        size=None if source.startswith(MEDMNIST_PREFIX) else size,
    )  # fmt: skip
    if site is None or split != "train":
        return dataset.converted(channels=channels, size=size)
    if not 0 <= site < num_sites:
        raise ValueError(f"site must be in [0, {num_sites}), got {site}")
    parts = partition(
        dataset.labels,
        scheme=scheme,
        num_sites=num_sites,
        seed=seed,
        alpha=alpha,
        shards_per_site=shards_per_site,
        min_size=min_size,
    )
    return dataset.subset(parts[site]).converted(channels=channels, size=size)
