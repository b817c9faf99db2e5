"""The one error the codec raises, with a machine-readable reason and a human sentence."""

from __future__ import annotations

from enum import StrEnum


class DecodeReason(StrEnum):
    """Why a message could not be decoded; the value travels in `x-fedmq-reason`."""

    NOT_MSGPACK = "not-msgpack"
    TRUNCATED = "truncated"
    TRAILING_BYTES = "trailing-bytes"
    NOT_A_MESSAGE = "not-a-message"
    UNKNOWN_KIND = "unknown-kind"
    WRONG_KIND = "wrong-kind"
    SCHEMA_VERSION = "schema-version"
    INVALID_FIELD = "invalid-field"
    BAD_DTYPE = "bad-dtype"
    SHAPE_MISMATCH = "shape-mismatch"
    NON_FINITE = "non-finite"
    OVERSIZED = "oversized"
    TOO_COMPLEX = "too-complex"
    """More objects, nesting or length than the expected model can need (a decode bomb)."""
    CONTENT_TYPE = "content-type"


class DecodeError(ValueError):
    """Bytes that are not an acceptable fedmq message.

    `reason` is stable and machine-readable (metrics labels, dead-letter headers);
    `detail` is a sentence for the operator reading the dead-letter queue.
    """

    def __init__(self, reason: DecodeReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
