"""msgpack codec: `encode(message) -> bytes`, `decode(bytes, accept=...) -> message`.

Nothing but msgpack maps, strings, numbers and `bin` blobs travels: no pickle, no
`torch.save`. Every way a body can be wrong ends in one `DecodeError` with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar, overload

import msgpack
from pydantic import BaseModel, ValidationError

from schemas.errors import DecodeError, DecodeReason
from schemas.limits import DecodeLimits, check_structure
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION, ModelUpdate

CONTENT_TYPE = "application/x-msgpack"
SCHEMA_HEADER = "fedmq-schema"
DEFAULT_LIMITS = DecodeLimits()
"""Bounds used when the consumer knows no model yet (generous: 4096 tensors, 128 MiB)."""

M = TypeVar("M", bound=BaseModel)

# pydantic error types that have a more precise reason than "invalid-field".
_REASON_BY_ERROR_TYPE = {
    "bad_dtype": DecodeReason.BAD_DTYPE,
    "shape_mismatch": DecodeReason.SHAPE_MISMATCH,
    "non_finite": DecodeReason.NON_FINITE,
    "finite_number": DecodeReason.NON_FINITE,
}


_LARGE_BIN = 4096
"""Blobs at least this large are joined into the output instead of packed (one copy, not two)."""


def encode(message: BaseModel) -> bytes:
    """Serialise a message; the body carries `kind` and `schema` so it is self-describing.

    The output is byte-for-byte what `msgpack.packb(..., use_bin_type=True)` would give, but
    tensor payloads are copied once, straight into the result.
    """
    body: dict[str, Any] = {"schema": SCHEMA_VERSION}
    body.update(message.model_dump())
    chunks: list[bytes] = []
    _append_packed(body, chunks, msgpack.Packer(use_bin_type=True))
    return b"".join(chunks)


def _append_packed(value: object, chunks: list[bytes], packer: msgpack.Packer) -> None:
    if isinstance(value, dict):
        chunks.append(packer.pack_map_header(len(value)))
        for key, item in value.items():
            chunks.append(packer.pack(key))
            _append_packed(item, chunks, packer)
    elif isinstance(value, list | tuple):
        chunks.append(packer.pack_array_header(len(value)))
        for item in value:
            _append_packed(item, chunks, packer)
    elif isinstance(value, bytes) and len(value) >= _LARGE_BIN:
        chunks.append(_bin_header(len(value)))
        chunks.append(value)
    else:
        chunks.append(packer.pack(value))


def _bin_header(length: int) -> bytes:
    if length < 1 << 8:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def signing_bytes(update: ModelUpdate) -> bytes:
    """Canonical bytes an Ed25519 signature covers: the update encoded without its signature."""
    return encode(update.model_copy(update={"signature": None}))


@overload
def decode(
    data: bytes, *, max_bytes: int | None = ..., limits: DecodeLimits = ...
) -> BaseModel: ...
@overload
def decode(
    data: bytes,
    *,
    accept: tuple[type[M], ...],
    max_bytes: int | None = ...,
    limits: DecodeLimits = ...,
) -> M: ...
def decode(
    data: bytes,
    *,
    accept: tuple[type[BaseModel], ...] | None = None,
    max_bytes: int | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> BaseModel:
    """Parse and validate a body; raise `DecodeError` for anything that is not acceptable.

    The body's structure is checked against `limits` (`max_bytes` overrides its byte
    bound) before anything is unpacked, so a crafted body cannot cost more memory than
    the limits allow.
    """
    if max_bytes is not None:
        limits = replace(limits, max_bytes=max_bytes)
    check_structure(data, limits)
    fields = _unpack_map(data, limits)
    schema = fields.pop("schema", None)
    if schema != SCHEMA_VERSION:
        raise DecodeError(
            DecodeReason.SCHEMA_VERSION,
            f"schema version {schema!r} is not understood (this reader speaks {SCHEMA_VERSION})",
        )
    kind = fields.get("kind")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(DecodeReason.UNKNOWN_KIND, f"unknown message kind {_short(kind)}")
    if accept is not None and cls not in accept:
        expected = ", ".join(sorted(_kind_of(c) for c in accept))
        raise DecodeError(DecodeReason.WRONG_KIND, f"got a {kind!r} message, expected {expected}")
    try:
        return cls.model_validate(fields)
    except ValidationError as error:
        raise _translate(error, str(kind)) from None


def check_envelope(content_type: str | None, headers: Mapping[str, object] | None) -> None:
    """Refuse a delivery whose AMQP properties say it is not a fedmq message of our schema."""
    if content_type != CONTENT_TYPE:
        raise DecodeError(
            DecodeReason.CONTENT_TYPE,
            f"content type {_short(content_type)} is not accepted (expected {CONTENT_TYPE})",
        )
    version = (headers or {}).get(SCHEMA_HEADER)
    if version != SCHEMA_VERSION:
        raise DecodeError(
            DecodeReason.SCHEMA_VERSION,
            f"header {SCHEMA_HEADER}={_short(version)} is not understood "
            f"(this reader speaks {SCHEMA_VERSION})",
        )


def _unpack_map(data: bytes, limits: DecodeLimits) -> dict[str, Any]:
    try:
        # msgpack's own bounds repeat the walk's: a second fence, should the two disagree.
        fields = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise DecodeError(
            DecodeReason.TRAILING_BYTES, "bytes follow the end of the message"
        ) from None
    except ValueError as error:
        if "incomplete" in str(error):
            raise DecodeError(DecodeReason.TRUNCATED, "the body ends mid-message") from None
        raise DecodeError(DecodeReason.NOT_MSGPACK, f"not msgpack: {error}") from None
    except Exception as error:  # msgpack raises several unrelated types for garbage
        raise DecodeError(
            DecodeReason.NOT_MSGPACK, f"not msgpack: {type(error).__name__}"
        ) from None
    if not isinstance(fields, dict):
        raise DecodeError(
            DecodeReason.NOT_A_MESSAGE, f"body is a msgpack {type(fields).__name__}, not a map"
        )
    return fields


def _translate(error: ValidationError, kind: str) -> DecodeError:
    problems = error.errors(include_url=False, include_input=False)
    for problem in problems:
        reason = _REASON_BY_ERROR_TYPE.get(problem["type"])
        if reason is not None:
            return DecodeError(reason, f"{kind}: {problem['msg']}")
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "(message)"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return DecodeError(DecodeReason.INVALID_FIELD, f"{kind}.{where}: {first['msg']}{more}")


def _kind_of(cls: type[BaseModel]) -> str:
    return str(cls.model_fields["kind"].default)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."
