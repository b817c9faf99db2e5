"""Where each model tensor lives inside the aggregator's one flat float32 vector.

Float tensors (parameters and float buffers, in `state_dict` order) occupy consecutive
slices of the vector; integer buffers such as BatchNorm's `num_batches_tracked` are listed
in the layout but kept out of the vector, so they are never aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

FloatVector = npt.NDArray[np.float32]
BoolMask = npt.NDArray[np.bool_]

FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
"""Wire dtypes that join the flat vector (always as float32 inside the aggregator)."""

INTEGER_DTYPES = frozenset({"int64", "int32", "uint8"})
"""Wire dtypes that are carried through unchanged and never aggregated."""

BN_RUNNING_SUFFIXES = (".running_mean", ".running_var")
"""Float buffers that only BatchNorm layers have, recognisable by name alone."""

BN_AFFINE_LEAVES = ("weight", "bias", "running_mean", "running_var")
"""Float entries of a BatchNorm module `<prefix>.<leaf>`."""


class LayoutMismatch(ValueError):
    """Tensors that do not fit the layout; `detail` is a sentence naming the tensor."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class LayoutEntry:
    """One tensor of the model: its `state_dict` name, wire dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        """Whether the tensor joins the flat vector (float) or is carried through (integer)."""
        return self.dtype in FLOAT_DTYPES

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


class ParamLayout:
    """Names, shapes, dtypes and offsets of a model's tensors in the flat float32 vector.

    `bn_prefixes` are the module names of the BatchNorm layers (e.g. `"layer1.0.bn1"`).
    Names alone cannot tell a BatchNorm `weight` from a conv `weight`, so the caller that
    knows the architecture (the model zoo) supplies them; `running_mean`/`running_var` are
    recognised by name even without a prefix.
    """

    def __init__(self, entries: Sequence[LayoutEntry], *, bn_prefixes: Iterable[str] = ()) -> None:
        self._entries = tuple(entries)
        _check_entries(self._entries)
        self._bn_prefixes = frozenset(bn_prefixes)
        slices: dict[str, slice] = {}
        offset = 0
        for entry in self._entries:
            if entry.is_float:
                slices[entry.name] = slice(offset, offset + entry.numel)
                offset += entry.numel
        self._size = offset
        self._slices = MappingProxyType(slices)
        self._by_name = MappingProxyType({e.name: e for e in self._entries})
        _check_bn_prefixes(self._bn_prefixes, self._by_name)

    @classmethod
    def from_entries(
        cls, entries: Iterable[tuple[str, str, Sequence[int]]], *, bn_prefixes: Iterable[str] = ()
    ) -> ParamLayout:
        """Build from `(name, wire dtype, shape)` triples in `state_dict` order."""
        built = [LayoutEntry(n, d, tuple(int(s) for s in shape)) for n, d, shape in entries]
        return cls(built, bn_prefixes=bn_prefixes)

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], *, bn_prefixes: Iterable[str] = ()
    ) -> ParamLayout:
        """Build from a `name -> array` mapping in `state_dict` order (dtype from numpy)."""
        triples = [(name, array.dtype.name, array.shape) for name, array in arrays.items()]
        return cls.from_entries(triples, bn_prefixes=bn_prefixes)

    @property
    def entries(self) -> tuple[LayoutEntry, ...]:
        """Every tensor, float and integer, in `state_dict` order."""
        return self._entries

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor name in `state_dict` order."""
        return tuple(e.name for e in self._entries)

    @property
    def float_names(self) -> tuple[str, ...]:
        """Names of the tensors inside the flat vector, in vector order."""
        return tuple(self._slices)

    @property
    def integer_names(self) -> tuple[str, ...]:
        """Names of the carried-through integer tensors."""
        return tuple(e.name for e in self._entries if not e.is_float)

    @property
    def bn_prefixes(self) -> frozenset[str]:
        """The BatchNorm module names supplied at construction."""
        return self._bn_prefixes

    @property
    def size(self) -> int:
        """Length of the flat vector (number of float elements)."""
        return self._size

    @property
    def slices(self) -> Mapping[str, slice]:
        """Slice of each float tensor inside the flat vector."""
        return self._slices

    @property
    def offsets(self) -> Mapping[str, int]:
        """Start offset of each float tensor inside the flat vector."""
        return MappingProxyType({name: s.start for name, s in self._slices.items()})

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> FloatVector:
        """Copy the float tensors of `arrays` into a new flat float32 vector.

        `arrays` must hold exactly the layout's tensors (integer ones included) with the
        layout's shapes; anything else raises `LayoutMismatch`.
        """
        self.check(arrays)
        out = np.empty(self._size, dtype=np.float32)
        for name, region in self._slices.items():
            target = out[region].reshape(self._by_name[name].shape)
            np.copyto(target, arrays[name], casting="unsafe")
        return out

    def unflatten(
        self, vector: np.ndarray, *, integers: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Views of `vector` shaped as the float tensors, in `state_dict` order (no copy).

        With `integers` (e.g. the `num_batches_tracked` counters to carry through), the
        result holds every tensor of the layout, the integer ones passed along unchanged.
        """
        if vector.dtype != np.float32 or vector.shape != (self._size,):
            raise LayoutMismatch(
                f"the flat vector is {vector.dtype} of shape {vector.shape} "
                f"but the layout needs float32 of shape ({self._size},)"
            )
        if integers is not None:
            self._check_integers(integers)
        result: dict[str, np.ndarray] = {}
        for entry in self._entries:
            if entry.is_float:
                result[entry.name] = vector[self._slices[entry.name]].reshape(entry.shape)
            elif integers is not None:
                result[entry.name] = integers[entry.name]
        return result

    def check(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Raise `LayoutMismatch` naming the first tensor that does not fit the layout."""
        problems = _name_problems(self._by_name, arrays)
        for name, array in arrays.items():
            entry = self._by_name.get(name)
            if entry is not None:
                problems.extend(_tensor_problems(entry, array))
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise LayoutMismatch(problems[0] + more)

    def batchnorm_mask(self) -> BoolMask:
        """Boolean mask over the vector: True for BatchNorm weights, biases and statistics."""
        mask = np.zeros(self._size, dtype=np.bool_)
        for name, region in self._slices.items():
            if self._is_batchnorm(name):
                mask[region] = True
        return mask

    def aggregation_mask(self, *, fedbn: bool) -> BoolMask:
        """Boolean mask of the coordinates that are aggregated (all, or all but BN with FedBN).

        Callers multiply each delta by this mask before submitting it to a strategy, so
        BN entries keep their global value while every site keeps its own.
        """
        if fedbn:
            return ~self.batchnorm_mask()
        return np.ones(self._size, dtype=np.bool_)

    def _is_batchnorm(self, name: str) -> bool:
        if name.endswith(BN_RUNNING_SUFFIXES):
            return True
        prefix, _, leaf = name.rpartition(".")
        return prefix in self._bn_prefixes and leaf in BN_AFFINE_LEAVES

    def _check_integers(self, integers: Mapping[str, np.ndarray]) -> None:
        expected = {n: self._by_name[n] for n in self.integer_names}
        problems = _name_problems(expected, integers)
        for name, array in integers.items():
            if name in expected:
                problems.extend(_tensor_problems(expected[name], array))
        if problems:
            raise LayoutMismatch(problems[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamLayout):
            return NotImplemented
        return self._entries == other._entries and self._bn_prefixes == other._bn_prefixes

    def __hash__(self) -> int:
        return hash((self._entries, self._bn_prefixes))

    def __repr__(self) -> str:
        return f"ParamLayout({len(self._entries)} tensors, size={self._size})"


def _check_entries(entries: Sequence[LayoutEntry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"tensor {entry.name!r} appears twice in the layout")
        seen.add(entry.name)
        if entry.dtype not in FLOAT_DTYPES | INTEGER_DTYPES:
            raise ValueError(f"tensor {entry.name!r} has unsupported dtype {entry.dtype!r}")
        if any(d < 0 for d in entry.shape):
            raise ValueError(f"tensor {entry.name!r} has a negative dimension {entry.shape}")


def _check_bn_prefixes(prefixes: frozenset[str], by_name: Mapping[str, LayoutEntry]) -> None:
    # A prefix that matches nothing is a typo in the model zoo; FedBN would silently do nothing.
    for prefix in sorted(prefixes):
        if not any(f"{prefix}.{leaf}" in by_name for leaf in BN_AFFINE_LEAVES):
            raise ValueError(f"BatchNorm prefix {prefix!r} matches no tensor of the layout")


def _name_problems(expected: Mapping[str, LayoutEntry], arrays: Mapping[str, object]) -> list[str]:
    problems = [
        f"tensor {name!r} is missing (the model expects shape {entry.shape})"
        for name, entry in expected.items()
        if name not in arrays
    ]
    problems.extend(
        f"tensor {name!r} is not part of the model" for name in arrays if name not in expected
    )
    return problems


def _tensor_problems(entry: LayoutEntry, array: np.ndarray) -> list[str]:
    problems: list[str] = []
    if tuple(array.shape) != entry.shape:
        problems.append(
            f"tensor {entry.name!r} has shape {tuple(array.shape)} "
            f"but the model expects {entry.shape}"
        )
    is_float = array.dtype.kind == "f" or array.dtype.name == "bfloat16"
    if is_float != entry.is_float:
        problems.append(
            f"tensor {entry.name!r} has dtype {array.dtype.name} "
            f"but the model expects {entry.dtype}"
        )
    return problems
