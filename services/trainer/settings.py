"""Settings of one trainer process: identity, data, simulated-site partition, limits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from services.common.settings import ServiceSettings

DEFAULT_DATA_SOURCE = "medmnist:pneumoniamnist"
DEFAULT_JOIN_TIMEOUT_S = 300.0
"""How long a trainer keeps asking to join while no aggregator answers, before it gives up."""


class TrainerSettings(ServiceSettings):
    """Everything a trainer needs besides the task spec the aggregator sends when it joins."""

    trainer_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """This site's identity: part of routing keys, queue names and (ideally) its broker login."""
    data_source: str = DEFAULT_DATA_SOURCE
    """`medmnist:<name>` or `folder:<path>` (an institution's own images)."""
    data_dir: Path | None = None
    """Directory holding MedMNIST `.npz` files (default: `$FEDMQ_DATA_DIR` or `~/.medmnist`)."""
    site_index: int | None = Field(default=None, ge=0)
    """Simulation: train on part `site_index` of `num_sites` of one dataset (None: all of it)."""
    num_sites: PositiveInt = 1
    """Simulation: number of parts the data set is split into."""
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    """Simulation: how the data set is split among the sites."""
    dirichlet_alpha: float = Field(default=0.5, gt=0.0)
    """Simulation: label skew of the dirichlet partition (small = strong skew)."""
    partition_seed: int = Field(default=0, ge=0)
    """Every simulated site must use the same partition seed to get disjoint parts."""
    seed: int = Field(default=0, ge=0)
    """Seeds torch and the data order: the same seed and model give the same update."""
    simulated_slowdown: float = Field(default=1.0, ge=1.0)
    """SIMULATION AID: stretch every batch to this many times its duration (straggler tests)."""
    max_updates: PositiveInt | None = None
    """Leave after sending this many updates (None: train until stopped)."""
    join_timeout: float = Field(default=DEFAULT_JOIN_TIMEOUT_S, gt=0.0)
    """Seconds to keep asking to join while no aggregator answers."""
    torch_threads: PositiveInt = 1
    """Intra-op threads torch may use."""
    signing_key_file: Path | None = None
    """Ed25519 private key (`fedmq keygen`) signing every update; needed when the task
    requires signatures."""

    @model_validator(mode="after")
    def _site_is_one_of_the_sites(self) -> TrainerSettings:
        if self.site_index is not None and self.site_index >= self.num_sites:
            raise ValueError(
                f"site_index must be below num_sites ({self.num_sites}), got {self.site_index}"
            )
        return self
