"""The training data of one site, loaded before joining and fitted to the task's input shape."""

from __future__ import annotations

from schemas import TaskSpec
from services.common.data import ImageDataset, load_site_dataset
from services.trainer.settings import TrainerSettings

FOLDER_PREFIX = "folder:"


def load_training_data(
    settings: TrainerSettings, *, channels: int | None = None, size: int | None = None
) -> ImageDataset:
    """This site's train split (its simulated partition when `site_index` is set)."""
    return load_site_dataset(
        settings.data_source,
        split="train",
        data_dir=settings.data_dir,
        site=settings.site_index,
        num_sites=settings.num_sites,
        scheme=settings.partition,
        alpha=settings.dirichlet_alpha,
        seed=settings.partition_seed,
        channels=channels,
        size=size,
    )


def fit_to_spec(dataset: ImageDataset, spec: TaskSpec, settings: TrainerSettings) -> ImageDataset:
    """`dataset` with the channels and image size the task's model expects.

    Image folders are decoded again at the task's size rather than resized from the
    28 x 28 they were first counted at (which would throw resolution away).
    """
    size = spec.image_size
    if dataset.channels == spec.in_channels and dataset.image_size == (size, size):
        return dataset
    if settings.data_source.startswith(FOLDER_PREFIX):
        return load_training_data(settings, channels=spec.in_channels, size=size)
    return dataset.converted(channels=spec.in_channels, size=size)
