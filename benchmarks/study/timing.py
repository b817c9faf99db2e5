"""The model of time: how long one site's local update takes on its own notional machine."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

from schemas import TaskSpec
from services.common.data import ImageDataset
from services.trainer.local_model import LocalModel
from services.trainer.local_round import run_local_round

BITS_PER_BYTE = 8
DEFAULT_BANDWIDTH_MBIT_S = 100.0
"""Link of every site to the broker: a hospital's ordinary uplink, not a data-centre fabric."""

MEASURE_STEPS = 8
"""Batches timed per repetition when measuring the training speed of this machine."""

MEASURE_REPEATS = 3


@dataclass(frozen=True)
class TimeModel:
    """Virtual seconds of one local update: compute at a measured speed, plus the transfers.

    A round downloads the model and uploads a delta of the same size, both at `bandwidth`.
    """

    seconds_per_sample: float
    model_bytes: int
    bandwidth_mbit_s: float = DEFAULT_BANDWIDTH_MBIT_S

    def __post_init__(self) -> None:
        if self.seconds_per_sample <= 0 or self.bandwidth_mbit_s <= 0 or self.model_bytes < 0:
            raise ValueError("need seconds_per_sample > 0, bandwidth > 0, model_bytes >= 0")

    @property
    def transfer_seconds(self) -> float:
        """Download of the global model plus upload of the delta."""
        return 2 * self.model_bytes * BITS_PER_BYTE / (self.bandwidth_mbit_s * 1e6)

    def compute_seconds(self, samples: int, *, slowdown: float = 1.0) -> float:
        return self.seconds_per_sample * samples * slowdown

    def update_seconds(self, samples: int, *, slowdown: float = 1.0) -> float:
        """Duration from taking a model to the update's arrival at the aggregator."""
        return self.compute_seconds(samples, slowdown=slowdown) + self.transfer_seconds


def measure_seconds_per_sample(spec: TaskSpec, dataset: ImageDataset) -> float:
    """Median training seconds per example of `spec`'s model on this machine, now.

    Runs the trainer's own local round (after one untimed warm-up round), so the speed is
    the one every simulated site is assumed to have.
    """
    local_spec = spec.model_copy(update={"local_steps": MEASURE_STEPS, "local_epochs": 1000})
    local = LocalModel(local_spec)
    stop = threading.Event()
    run_local_round(local, dataset, seed=0, stop=stop)
    rates = []
    for repeat in range(MEASURE_REPEATS):
        started = time.perf_counter()
        result = run_local_round(local, dataset, seed=repeat + 1, stop=stop)
        rates.append((time.perf_counter() - started) / result.examples_seen)
    return statistics.median(rates)
