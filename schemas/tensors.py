"""Tensors on the wire: `{name, dtype, shape, data}`, a dtype allow-list, zero-copy decode."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

DType = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8"]
"""Every dtype a tensor may travel as; anything else is refused with `bad-dtype`."""

Precision = Literal["float32", "float16", "bfloat16"]
"""Transport precisions a task may choose for floating-point tensors."""

ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})

MAX_TENSOR_DIMS = 8
"""No layer of an image classifier has more dimensions; more is hostile or broken."""

MAX_NAME_LENGTH = 256

MAX_DECLARED_BYTES = 2**40
"""A tensor whose non-zero dimensions alone would span more than this (1 TiB) is refused,
also when another dimension is 0 and it holds no data: numpy cannot even shape a view
of it, so `to_numpy` would raise on a tensor that passed validation."""

# numpy has no bfloat16: it travels as the upper 16 bits of a float32.
_NUMPY_DTYPES: dict[str, npt.DTypeLike] = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
}
_NUMPY_NAMES = {np.dtype(v).name: k for k, v in _NUMPY_DTYPES.items()}


class Tensor(BaseModel):
    """One named tensor; `data` holds `prod(shape) * itemsize` little-endian bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    # The allow-list and the rank limit are checked by the validators below (with reasons
    # of their own); `json_schema_extra` only states them in the published JSON Schema.
    dtype: Annotated[str, Field(json_schema_extra={"enum": sorted(ITEMSIZE)})]
    shape: Annotated[
        tuple[Annotated[int, Field(ge=0)], ...],
        Field(json_schema_extra={"maxItems": MAX_TENSOR_DIMS}),
    ]
    data: bytes

    @field_validator("dtype")
    @classmethod
    def _dtype_is_allowed(cls, value: str) -> str:
        if value not in ITEMSIZE:
            raise PydanticCustomError(
                "bad_dtype",
                "dtype {dtype} is not allowed (allowed: {allowed})",
                {"dtype": value[:32], "allowed": ", ".join(sorted(ITEMSIZE))},
            )
        return value

    @field_validator("shape", mode="before")
    @classmethod
    def _shape_is_a_short_sequence(cls, value: object) -> object:
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple) and len(value) > MAX_TENSOR_DIMS:
            raise PydanticCustomError(
                "shape_mismatch",
                "shape has {dims} dimensions, at most {limit} are allowed",
                {"dims": len(value), "limit": MAX_TENSOR_DIMS},
            )
        return value

    @model_validator(mode="after")
    def _data_matches_shape_and_is_finite(self) -> Tensor:
        spanned = math.prod(d for d in self.shape if d) * ITEMSIZE[self.dtype]
        if spanned > MAX_DECLARED_BYTES:
            raise PydanticCustomError(
                "shape_mismatch",
                "tensor {name}: shape {shape} declares more than {limit} bytes",
                {"name": self.name[:64], "shape": list(self.shape), "limit": MAX_DECLARED_BYTES},
            )
        expected = math.prod(self.shape) * ITEMSIZE[self.dtype]
        if len(self.data) != expected:
            raise PydanticCustomError(
                "shape_mismatch",
                "tensor {name}: shape {shape} of {dtype} needs {expected} bytes, got {actual}",
                {
                    "name": self.name,
                    "shape": list(self.shape),
                    "dtype": self.dtype,
                    "expected": expected,
                    "actual": len(self.data),
                },
            )
        if self.dtype in FLOAT_DTYPES and not _all_finite(self.data, self.dtype):
            raise PydanticCustomError(
                "non_finite", "tensor {name} contains NaN or Inf", {"name": self.name}
            )
        return self

    @property
    def nbytes(self) -> int:
        """Size of the payload on the wire."""
        return len(self.data)

    def to_numpy(self) -> npt.NDArray[np.generic]:
        """A read-only view of `data` (no copy); bfloat16 is widened to float32 (one copy)."""
        if self.dtype == "bfloat16":
            return bfloat16_to_float32(self.data).reshape(self.shape)
        return np.frombuffer(self.data, dtype=_NUMPY_DTYPES[self.dtype]).reshape(self.shape)

    @classmethod
    def from_numpy(
        cls, name: str, array: npt.NDArray[np.generic], *, precision: Precision | None = None
    ) -> Tensor:
        """Wrap an array; floating-point arrays are cast to `precision` when one is given."""
        dtype = _NUMPY_NAMES.get(array.dtype.name)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: numpy dtype {array.dtype} cannot travel")
        if precision is not None and dtype in FLOAT_DTYPES and dtype != precision:
            if precision == "bfloat16":
                data = float32_to_bfloat16(np.asarray(array, dtype=np.float32))
            else:
                data = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[precision]).tobytes()
            dtype = precision
        else:
            little_endian = array.dtype.newbyteorder("<")
            data = np.ascontiguousarray(array).astype(little_endian, copy=False).tobytes()
        return cls(name=name, dtype=dtype, shape=tuple(int(d) for d in array.shape), data=data)


def float32_to_bfloat16(array: npt.NDArray[np.float32]) -> bytes:
    """Round float32 to bfloat16 (round to nearest, ties to even) and return the raw bytes."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16).tobytes()


def bfloat16_to_float32(data: bytes) -> npt.NDArray[np.float32]:
    """Widen raw bfloat16 bytes to a float32 array (exact)."""
    halves = np.frombuffer(data, dtype=np.uint16)
    return (halves.astype(np.uint32) << 16).view(np.float32)


FINITE_CHUNK = 1 << 16
"""Elements per dot product of the finiteness scan."""


def _all_finite(data: bytes, dtype: str) -> bool:
    if dtype == "bfloat16":
        exponent = np.frombuffer(data, dtype=np.uint16) & np.uint16(0x7F80)
        return not bool((exponent == 0x7F80).any())
    values = np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype])
    if dtype != "float32":
        return bool(np.isfinite(values).all())
    # NaN or Inf anywhere makes x.x non-finite; a finite x.x proves the chunk finite. A
    # native dot reads the data once without the boolean array `isfinite` allocates; only
    # a chunk whose squares overflow (finite but huge values) is looked at element-wise.
    # (Only float32 has a fast native dot; float16 and float64 dots are slower than isfinite.)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, values.size, FINITE_CHUNK):
            part = values[start : start + FINITE_CHUNK]
            if not math.isfinite(float(np.dot(part, part))) and not np.isfinite(part).all():
                return False
    return True
