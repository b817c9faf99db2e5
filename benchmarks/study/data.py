"""The study's data, loaded once per process: pooled train split, test split, site partitions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.data import ImageDataset, load_site_dataset, partition

DATA_SOURCE = "medmnist:pneumoniamnist"


@dataclass(frozen=True)
class Partition:
    """How the pooled train split is cut into sites (the project's own partitioner)."""

    scheme: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0

    @property
    def label(self) -> str:
        return "IID" if self.scheme == "iid" else f"Dirichlet {self.alpha:g}"


@dataclass
class StudyData:
    """Train and test splits in memory; each partition is cut once and then reused."""

    data_dir: Path | None
    train: ImageDataset
    test: ImageDataset
    _sites: dict[tuple[Partition, int], list[ImageDataset]] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: Path | None) -> StudyData:
        def split(name: str) -> ImageDataset:
            return load_site_dataset(DATA_SOURCE, split=name, data_dir=data_dir, download=False)

        return cls(data_dir=data_dir, train=split("train"), test=split("test"))

    def sites(self, cut: Partition, num_sites: int) -> list[ImageDataset]:
        """Each site's examples, exactly as `fedmq trainer --site-index i` would load them."""
        key = (cut, num_sites)
        if key not in self._sites:
            parts = partition(
                self.train.labels, scheme=cut.scheme, num_sites=num_sites, seed=cut.seed,
                alpha=cut.alpha,
            )  # fmt: skip
            self._sites[key] = [self.train.subset(part) for part in parts]
        return self._sites[key]
