"""Combining K flat deltas into one: weighted mean, coordinate median, trimmed mean, L2 clipping.

All statistics are vectorised over a stacked `(K, P)` array; nothing loops per coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatVector = npt.NDArray[np.float32]
AggregatorName = Literal["mean", "median", "trimmed_mean"]


NORM_CHUNK = 1 << 16
"""Elements per partial sum of `l2_norm`: short enough that a float32 sum stays accurate."""


def l2_norm(delta: np.ndarray) -> float:
    """Euclidean norm: float32 partial sums over chunks, added up in Python floats.

    A float64 copy of a whole model costs 10-50x the native dot product; per-chunk
    sums keep the error near float32 rounding (about 1e-7 relative). A chunk whose
    float32 sum overflows (huge, hostile values) is summed again in float64.
    """
    flat = delta.reshape(-1)
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat.size, NORM_CHUNK):
            part = flat[start : start + NORM_CHUNK]
            partial = float(np.dot(part, part))
            if not math.isfinite(partial):
                wide = part.astype(np.float64)
                partial = float(np.dot(wide, wide))
            total += partial
    return math.sqrt(total)


def clip_l2(delta: FloatVector, max_norm: float) -> FloatVector:
    """Scale `delta` down to L2 norm `max_norm` if it is longer; return it unchanged otherwise.

    The input is never modified; a delta within the bound is returned as is (no copy).
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = l2_norm(delta)
    if norm <= max_norm:
        return delta
    return (delta * np.float32(max_norm / norm)).astype(np.float32, copy=False)


def weighted_sum(deltas: Sequence[FloatVector], coefficients: Sequence[float]) -> FloatVector:
    """Σ c_i d_i in float32, one delta at a time into one scratch array (no (K, P) copy).

    float32 is exact enough here (K terms, relative error about K x 6e-8) and 3x faster
    than widening every delta to float64. With |c_i| summing to at most 1, as the mean's
    coefficients do, no partial sum can exceed the largest |d_i|, so nothing overflows.
    """
    _check_nonempty(deltas)
    if len(deltas) != len(coefficients):
        raise ValueError(f"{len(deltas)} deltas but {len(coefficients)} coefficients")
    acc = np.multiply(deltas[0], np.float32(coefficients[0]), dtype=np.float32)
    scratch = np.empty_like(acc)
    for delta, coefficient in zip(deltas[1:], coefficients[1:], strict=True):
        np.multiply(delta, np.float32(coefficient), out=scratch, dtype=np.float32)
        acc += scratch
    return acc


def weighted_mean(deltas: Sequence[FloatVector], weights: Sequence[float]) -> FloatVector:
    """Σ w_i d_i / Σ w_i."""
    total = math.fsum(weights)
    if len(weights) != len(deltas) or total <= 0 or min(weights, default=0) < 0:
        raise ValueError(f"need one non-negative weight per delta with a positive sum: {weights}")
    return weighted_sum(deltas, [w / total for w in weights])


def coordinate_median(deltas: Sequence[FloatVector]) -> FloatVector:
    """Per-coordinate median (mean of the two middle values for even K)."""
    _check_nonempty(deltas)
    median: FloatVector = np.median(np.stack(deltas), axis=0).astype(np.float32, copy=False)
    return median


def trimmed_mean(deltas: Sequence[FloatVector], beta: float) -> FloatVector:
    """Per-coordinate mean after dropping the ⌊beta·K⌋ smallest and largest values."""
    _check_nonempty(deltas)
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    count = len(deltas)
    trim = math.floor(beta * count)
    stacked = np.stack(deltas)
    if trim > 0:
        # After partitioning at both cut points, rows trim..K-trim-1 hold exactly the middle.
        stacked = np.partition(stacked, (trim, count - trim - 1), axis=0)[trim : count - trim]
    mean: FloatVector = stacked.mean(axis=0, dtype=np.float64).astype(np.float32)
    return mean


def _check_nonempty(deltas: Sequence[FloatVector]) -> None:
    if not deltas:
        raise ValueError("cannot aggregate zero deltas")
