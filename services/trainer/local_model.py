"""A site's copy of the task's model: load a global version, snapshot its base, compute a delta.

`delta = local - base` covers the floating-point `state_dict` entries only: integer buffers
(BatchNorm's `num_batches_tracked`) are never aggregated, so they never travel. With FedBN
the BatchNorm entries stay local: a new global model does not overwrite them, and their
delta is sent as zeros (the aggregator masks them out anyway; the site's statistics stay
at the site).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from torch import nn

from schemas import GlobalModel, Precision, TaskSpec, Tensor
from services.common.models import (
    batchnorm_prefixes,
    build_model,
    load_state_arrays,
    state_arrays,
    state_entries,
)

Arrays = dict[str, npt.NDArray[np.generic]]

NORM_SAFETY_MARGIN = 0.999
"""A clipped delta aims this fraction below the task's norm bound, so that rounding to
fp16/bf16 on the way out cannot push it over the bound."""


class ModelMismatch(ValueError):
    """A global model whose tensors do not fit the model the task spec describes."""


class DeltaNotFinite(ValueError):
    """Local training produced NaN or Inf weights: the update must not be sent."""


class LocalModel:
    """The torch model of one participant plus the global weights its training started from."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.model: nn.Module = build_model(
            spec.model,
            num_classes=spec.num_classes,
            in_channels=spec.in_channels,
            image_size=spec.image_size,
            seed=spec.seed,
        )
        entries = state_entries(self.model)
        self.float_names: tuple[str, ...] = tuple(n for n, d, _ in entries if d == "float32")
        names = [name for name, _, _ in entries]
        self.local_names: frozenset[str] = (
            _batchnorm_entries(self.model, names) if spec.fedbn else frozenset()
        )
        self._base: Arrays = {}
        self.base_version: int | None = None
        self._has_local_state = False

    def load_global(self, model: GlobalModel) -> None:
        """Start from `model`: its weights become the local weights and the delta's base.

        With FedBN the BatchNorm entries trained here earlier are kept.
        """
        arrays = global_arrays(model)
        if self.local_names and self._has_local_state:
            current = state_arrays(self.model, copy=True)
            arrays.update({name: current[name] for name in self.local_names})
        self._load(arrays)
        self._base = {name: _owned_copy(array) for name, array in arrays.items()}
        self.base_version = model.version

    def reset_to_base(self) -> None:
        """Undo local training: back to the base weights (local BatchNorm kept under FedBN)."""
        if self.base_version is None:
            raise RuntimeError("no global model loaded yet")
        arrays = dict(self._base)
        if self.local_names:
            current = state_arrays(self.model, copy=True)
            arrays.update({name: current[name] for name in self.local_names})
        self._load(arrays)

    def mark_trained(self) -> None:
        """Local training ran: from now on the BatchNorm entries are this site's own (FedBN)."""
        self._has_local_state = True

    def delta(self, *, precision: Precision, max_norm: float | None = None) -> tuple[Tensor, ...]:
        """`local - base` for every float entry, in `state_dict` order, cast to `precision`.

        When `max_norm` is set the whole delta is scaled down to fit the bound (the
        aggregator would reject a larger one). Raises `DeltaNotFinite` after divergence.
        """
        local = state_arrays(self.model)
        diffs = {name: self._entry_delta(name, local[name]) for name in self.float_names}
        norm = math.sqrt(sum(_squared_norm(d) for d in diffs.values()))
        if not math.isfinite(norm):
            raise DeltaNotFinite("local training produced non-finite weights")
        scale = np.float32(clip_scale(norm, max_norm))
        return tuple(
            Tensor.from_numpy(name, d * scale if scale < 1.0 else d, precision=precision)
            for name, d in diffs.items()
        )

    def _entry_delta(self, name: str, local: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        base = self._base[name]
        if name in self.local_names:
            return np.zeros(base.shape, dtype=np.float32)
        diff: npt.NDArray[np.float32] = np.subtract(local, base, dtype=np.float32)
        return diff

    def _load(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
        try:
            load_state_arrays(self.model, arrays)
        except ValueError as error:
            raise ModelMismatch(
                f"the global model does not fit {self.spec.model!r}: {error}"
            ) from error


def global_arrays(model: GlobalModel) -> Arrays:
    """`name -> array` of a global model's tensors (bf16/fp16 widened to float32)."""
    arrays: Arrays = {}
    for tensor in model.tensors:
        array = tensor.to_numpy()
        arrays[tensor.name] = array.astype(np.float32) if tensor.dtype == "float16" else array
    return arrays


def clip_scale(norm: float, max_norm: float | None) -> float:
    """Factor (<= 1) that brings a delta of L2 norm `norm` under `max_norm` with a margin."""
    if max_norm is None or norm <= max_norm * NORM_SAFETY_MARGIN:
        return 1.0
    return max_norm * NORM_SAFETY_MARGIN / norm


def _batchnorm_entries(model: nn.Module, names: list[str]) -> frozenset[str]:
    prefixes = batchnorm_prefixes(model)
    return frozenset(name for name in names if name.rpartition(".")[0] in prefixes)


def _owned_copy(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    # Floats as float32 (what deltas are computed in); a copy, not a view of message bytes.
    dtype = np.float32 if np.issubdtype(array.dtype, np.floating) else array.dtype
    return np.array(array, dtype=dtype, copy=True)


def _squared_norm(array: npt.NDArray[np.float32]) -> float:
    # In float64: a float32 dot product overflows to inf for large but finite deltas.
    flat = array.ravel().astype(np.float64)
    return float(np.dot(flat, flat))
