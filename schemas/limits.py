"""Bounds on what decoding a body may allocate, checked by walking its msgpack structure first.

msgpack's own limits bound each container, not their total: 16 MiB of nested empty maps
would become millions of Python objects (~2 GiB). The walk below counts every object,
depth and declared length before a single object is built, so a body costs at most its
bounds, and the bounds follow the model a consumer expects (its tensor count and size).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from schemas.errors import DecodeError, DecodeReason

DEFAULT_MAX_MESSAGE_BYTES: Final = 128 * 1024 * 1024
"""Larger bodies are refused before unpacking when no model says better (ResNet-18: ~45 MiB)."""
MAX_DEPTH: Final = 6
"""Deepest nesting a fedmq message has: message -> delta list -> tensor map -> shape list."""
MAX_MAP_LEN: Final = 64
"""Widest map: a message's fields (< 20) or its metrics (at most 32)."""
MAX_STR_LEN: Final = 4096
"""Longest string: a rejection's detail."""
FIXED_OBJECTS: Final = 512
"""Objects of a message besides its tensors (fields, metrics, signature, strings)."""
OBJECTS_PER_TENSOR: Final = 24
"""A tensor map: 4 keys, 4 values and a shape of up to 8 dimensions, with room to spare."""
BYTES_PER_TENSOR: Final = 512
"""Envelope of one tensor on the wire besides its data (name, dtype, shape, headers)."""
MAX_ITEMSIZE: Final = 8
"""float64, the widest dtype the allow-list accepts, against the model's float32."""
DEFAULT_TENSORS: Final = 4096
"""The most tensors a message may carry (`schemas.messages.TensorList`)."""
DEFAULT_MAX_ARRAY_LEN: Final = 100_000
"""The longest list any message has: an evaluation report's per-class accuracies."""
DEFAULT_MAX_OBJECTS: Final = 200_000
"""Enough for 4096 tensors or 100,000 per-class numbers; about 12 MiB of Python objects."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one body may hold; `for_model` sizes them from the model a consumer expects."""

    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_objects: int = DEFAULT_MAX_OBJECTS
    max_depth: int = MAX_DEPTH
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN
    max_map_len: int = MAX_MAP_LEN
    max_str_len: int = MAX_STR_LEN
    max_bin_len: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def for_model(cls, *, tensors: int, float_elements: int) -> DecodeLimits:
        """Limits for updates of a model of `tensors` float tensors holding `float_elements`.

        The byte bound admits every tensor in float64 (twice the float32 size) plus each
        tensor's envelope: a valid update always fits, a body much larger never does.
        """
        if tensors < 1 or float_elements < 1:
            raise ValueError(f"a model needs tensors and elements, got {tensors}/{float_elements}")
        data = float_elements * MAX_ITEMSIZE
        return cls(
            max_bytes=data + BYTES_PER_TENSOR * tensors + 64 * 1024,
            max_objects=FIXED_OBJECTS + OBJECTS_PER_TENSOR * tensors,
            max_array_len=max(tensors, 64),
            max_bin_len=data,
        )


_FIXED: Final = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4,
                 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5,
                 0xD7: 9, 0xD8: 17}  # fmt: skip
"""Scalars of a fixed size after their type byte (fixext includes its type byte)."""
_SIZED: Final = {0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4), 0xC7: ("ext", 1),
                 0xC8: ("ext", 2), 0xC9: ("ext", 4), 0xD9: ("str", 1), 0xDA: ("str", 2),
                 0xDB: ("str", 4), 0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2),
                 0xDF: ("map", 4)}  # fmt: skip
"""Type byte -> (family, width of its big-endian length)."""
_WIDTH: Final = {1: ">B", 2: ">H", 4: ">I"}


def check_structure(data: bytes, limits: DecodeLimits) -> None:
    """Walk the msgpack structure of `data`; `DecodeError` if it exceeds `limits`.

    Nothing is allocated per object, and the walk stops at the first excess, so its cost
    is bounded by `limits.max_objects` whatever the body holds.
    """
    if len(data) > limits.max_bytes:
        raise DecodeError(
            DecodeReason.OVERSIZED,
            f"body of {len(data)} bytes exceeds the limit of {limits.max_bytes}",
        )
    open_items: list[int] = []  # items still expected by each open container
    pos, objects, end = 0, 0, len(data)
    while True:
        if pos >= end:
            raise DecodeError(DecodeReason.TRUNCATED, "the body ends mid-message")
        objects += 1
        if objects > limits.max_objects:
            raise _too_complex(f"more than {limits.max_objects} msgpack objects")
        family, count, pos = _read_head(data, pos, limits)
        if family in ("array", "map") and count > 0:
            open_items.append(count * 2 if family == "map" else count)
            if len(open_items) > limits.max_depth:
                raise _too_complex(f"nested deeper than {limits.max_depth}")
            continue
        if _close(open_items):
            return


def _close(open_items: list[int]) -> bool:
    """One object finished: count it in its container; True when the top level is done."""
    while open_items:
        open_items[-1] -= 1
        if open_items[-1] > 0:
            return False
        open_items.pop()  # a finished container is itself one finished object
    return True


def _read_head(data: bytes, pos: int, limits: DecodeLimits) -> tuple[str, int, int]:
    """Read one type byte (and length); return (family, count or length, next position)."""
    byte = data[pos]
    pos += 1
    if byte <= 0x7F or byte >= 0xE0:
        return "int", 0, pos
    if byte <= 0x8F:
        return _container("map", byte & 0x0F, pos, limits)
    if byte <= 0x9F:
        return _container("array", byte & 0x0F, pos, limits)
    if byte <= 0xBF:
        return _blob("str", byte & 0x1F, data, pos, limits)
    if byte in _FIXED:
        return _skip("scalar", _FIXED[byte], data, pos)
    if byte not in _SIZED:
        raise DecodeError(DecodeReason.NOT_MSGPACK, f"not msgpack: type byte 0x{byte:02x}")
    family, width = _SIZED[byte]
    if pos + width > len(data):
        raise DecodeError(DecodeReason.TRUNCATED, "the body ends mid-message")
    (length,) = struct.unpack_from(_WIDTH[width], data, pos)
    pos += width
    if family in ("array", "map"):
        return _container(family, length, pos, limits)
    if family == "ext":
        raise DecodeError(DecodeReason.NOT_MSGPACK, "msgpack extension types are not accepted")
    return _blob(family, length, data, pos, limits)


def _container(family: str, count: int, pos: int, limits: DecodeLimits) -> tuple[str, int, int]:
    bound = limits.max_map_len if family == "map" else limits.max_array_len
    if count > bound:
        raise _too_complex(f"a {family} of {count} entries (at most {bound})")
    return family, count, pos


def _blob(
    family: str, length: int, data: bytes, pos: int, limits: DecodeLimits
) -> tuple[str, int, int]:
    bound = limits.max_str_len if family == "str" else limits.max_bin_len
    if length > bound:
        raise _too_complex(f"a {family} of {length} bytes (at most {bound})")
    return _skip(family, length, data, pos)


def _skip(family: str, length: int, data: bytes, pos: int) -> tuple[str, int, int]:
    if pos + length > len(data):
        raise DecodeError(DecodeReason.TRUNCATED, "the body ends mid-message")
    return family, 0, pos + length


def _too_complex(what: str) -> DecodeError:
    return DecodeError(DecodeReason.TOO_COMPLEX, f"body holds {what}")
