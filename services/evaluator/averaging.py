"""An exponential moving average of model versions: the served model, steadier than any one.

Under label skew each version's decision threshold is pulled by whichever sites filled the
last buffer; averaging the weights of the recent versions cancels most of that pull while
the ranking they share is kept (Polyak averaging; an EMA of the global model as in
"EMA of versions" remedies). Trainers keep following the versions themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from services.aggregator.layout import ParamLayout

FloatVector = npt.NDArray[np.float32]


class VersionAverage:
    """`average <- average + (1 - decay**gap) * (weights - average)` for each version seen.

    `gap` is how many versions passed since the last one observed, so an observer that misses
    versions (a follower queue keeps only the newest) weighs what it sees as if it had seen
    each of them: the newest stands in for the ones skipped.
    """

    def __init__(self, *, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.weights: FloatVector | None = None
        self.version: int | None = None

    def observe(self, weights: FloatVector, *, version: int) -> FloatVector:
        """Fold `weights` of `version` in; the average after it (a new array)."""
        if self.weights is None or self.version is None or self.weights.shape != weights.shape:
            self.weights = np.array(weights, dtype=np.float32, copy=True)
        elif version > self.version:
            keep = np.float32(self.decay ** (version - self.version))
            self.weights = (keep * self.weights + (np.float32(1.0) - keep) * weights).astype(
                np.float32, copy=False
            )
        else:
            return self.weights  # an older or repeated version: nothing new
        self.version = version
        return self.weights


class ServedAverage:
    """The served model's weights: the `VersionAverage` of `state_dict` arrays.

    Float tensors (weights and BatchNorm statistics) are averaged; integer buffers
    (`num_batches_tracked`) are the newest version's.
    """

    def __init__(self, *, decay: float) -> None:
        self._average = VersionAverage(decay=decay)
        self._layout: ParamLayout | None = None

    def observe(
        self, arrays: Mapping[str, npt.NDArray[Any]], *, version: int
    ) -> dict[str, npt.NDArray[Any]]:
        """Fold the weights of `version` in; the averaged `name -> array` (new arrays)."""
        if self._layout is None:
            self._layout = ParamLayout.from_arrays(arrays)
        layout = self._layout
        averaged = self._average.observe(layout.flatten(arrays), version=version)
        integers = {name: np.array(arrays[name]) for name in layout.integer_names}
        return layout.unflatten(averaged.copy(), integers=integers)
