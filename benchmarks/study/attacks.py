"""Byzantine trainers: a well-formed update whose delta was scaled (sign-flipped, amplified)."""

from __future__ import annotations

import numpy as np

from schemas import ModelUpdate, Tensor


def scaled_update(update: ModelUpdate, scale: float) -> ModelUpdate:
    """`update` with every delta tensor multiplied by `scale` (-1: sign flip).

    The result passes every check of the aggregator (finite, right shapes, no norm bound
    set): only the aggregation rule can limit its damage.
    """
    factor = np.float32(scale)
    delta = tuple(
        Tensor.from_numpy(t.name, np.asarray(t.to_numpy(), dtype=np.float32) * factor)
        for t in update.delta
    )
    return update.model_copy(update={"delta": delta})


def delta_norm(update: ModelUpdate) -> float:
    """L2 norm of the whole delta (what DP clipping and norm bounds compare)."""
    squares = sum(
        float(np.dot(a.ravel(), a.ravel()))
        for a in (np.asarray(t.to_numpy(), dtype=np.float64) for t in update.delta)
    )
    return float(np.sqrt(squares))
