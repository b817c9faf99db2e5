"""Hostile AMQP messages for fuzzing the aggregator: bodies and properties that must be refused.

Every builder takes a seeded `random.Random` and returns a `Hostile`: a body, the AMQP
properties it travels with, and a label saying what is wrong with it. Nothing built here
can be a valid update for the task's model: mutations start from a `seed_update` whose
only tensor fits no layout, and full-size updates are only truncated or flipped in their
first bytes (the map header, `schema` and `kind`), never in their payload.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from schemas import CONTENT_TYPE, SCHEMA_HEADER, SCHEMA_VERSION, ModelUpdate, Tensor, encode

GOOD_HEADERS: dict[str, object] = {SCHEMA_HEADER: SCHEMA_VERSION}


@dataclass(frozen=True)
class Hostile:
    """One message to publish: what is wrong with it, its body and its AMQP properties."""

    label: str
    body: bytes
    kind: str | None = "model_update"
    content_type: str | None = CONTENT_TYPE
    headers: dict[str, object] | None = field(default_factory=lambda: dict(GOOD_HEADERS))
    message_id: str | None = "set-by-publisher"


def seed_update(task_id: str, trainer_id: str = "fuzz") -> bytes:
    """A well-formed `ModelUpdate` whose one small tensor matches no model (shape-mismatch)."""
    update = ModelUpdate(
        task_id=task_id,
        trainer_id=trainer_id,
        base_version=0,
        num_examples=10,
        delta=(Tensor.from_numpy("nowhere", np.ones(4, np.float32)),),
        metrics={"loss": 0.5},
    )
    return encode(update)


def _fields(task_id: str) -> dict[str, Any]:
    fields: dict[str, Any] = msgpack.unpackb(seed_update(task_id), raw=False)
    return fields


def _pack(fields: dict[str, Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


_ODD_VALUES: tuple[object, ...] = (
    None, True, -1, 0, 2**63, -(2**63), 1.5, math.nan, math.inf, "", "x" * 300, b"\x00" * 9,
    [], [1, 2, 3], {}, {"a": 1}, [[[[]]]],
)  # fmt: skip


def random_bytes(rng: random.Random, task_id: str) -> Hostile:
    """Bytes from a random source, of random length (empty included)."""
    return Hostile("random-bytes", rng.randbytes(rng.choice((0, 1, 7, 64, 512, 4096))))


def truncated(rng: random.Random, task_id: str) -> Hostile:
    """A well-formed body cut short at a random byte."""
    body = seed_update(task_id)
    return Hostile("truncated", body[: rng.randrange(len(body))])


def bit_flipped(rng: random.Random, task_id: str) -> Hostile:
    """A well-formed (shape-mismatched) body with 1 to 8 random bits flipped."""
    body = bytearray(seed_update(task_id))
    for _ in range(rng.randint(1, 8)):
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    return Hostile("bit-flipped", bytes(body))


def wrong_types(rng: random.Random, task_id: str) -> Hostile:
    """Valid msgpack, every field present, one or more of them of a wrong type or value."""
    fields = _fields(task_id)
    for key in rng.sample(sorted(fields), rng.randint(1, 3)):
        fields[key] = rng.choice(_ODD_VALUES)
    if rng.random() < 0.3:
        fields["delta"] = [{"name": "w", "dtype": rng.choice(("float32", "complex64", 7, None)),
                            "shape": rng.choice(([4], "4", [-4], [4.0], None)),
                            "data": rng.choice((b"\0" * 16, "abcd", 16, None))}]  # fmt: skip
    return Hostile("wrong-types", _pack(fields))


def huge_shape(rng: random.Random, task_id: str) -> Hostile:
    """A tensor declaring an enormous shape (zero elements, or far more than its data)."""
    fields = _fields(task_id)
    shape = rng.choice(
        ([2**63 - 1, 0], [2**64 - 1, 0, 2**64 - 1], [0, 2**40, 2**40], [2**31, 2**31],
         [2**62, 4], [1] * 9, [2**16] * 8, [0, 2**63 + 5])
    )  # fmt: skip
    fields["delta"] = [{"name": rng.choice(("nowhere", "classifier.4.bias")), "dtype": "float32",
                        "shape": shape, "data": b""}]  # fmt: skip
    return Hostile("huge-shape", _pack(fields))


def non_finite(rng: random.Random, task_id: str) -> Hostile:
    """NaN or Inf in a tensor, in the metrics or in a timestamp."""
    fields = _fields(task_id)
    bad = rng.choice((math.nan, math.inf, -math.inf))
    where = rng.choice(("tensor", "metrics", "created_at"))
    if where == "tensor":
        dtype = rng.choice(("float32", "float64", "float16"))
        values = np.full(4, bad, dtype=dtype)
        fields["delta"] = [{"name": "nowhere", "dtype": dtype, "shape": [4],
                            "data": values.tobytes()}]  # fmt: skip
    elif where == "metrics":
        fields["metrics"] = {"loss": bad}
    else:
        fields["created_at"] = bad
    return Hostile("non-finite", _pack(fields))


def enormous_declared_size(rng: random.Random, task_id: str) -> Hostile:
    """msgpack headers that declare gigabytes (bin, str, array, map) over a short body."""
    prefix = rng.choice(
        (b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xf0", b"\xdd\xff\xff\xff\xff",
         b"\xdf\x7f\xff\xff\xff", b"\x81\xa6schema\x01\xa5delta\xdd\xff\xff\xff\xff")
    )  # fmt: skip
    return Hostile("enormous-declared-size", prefix + rng.randbytes(rng.randrange(0, 32)))


def wrong_content_type(rng: random.Random, task_id: str) -> Hostile:
    """A well-formed body labelled as something else."""
    content_type = rng.choice(("text/plain", "application/json", "application/x-msgpack; v=2",
                               "application/octet-stream", ""))  # fmt: skip
    return Hostile("wrong-content-type", seed_update(task_id), content_type=content_type)


def missing_properties(rng: random.Random, task_id: str) -> Hostile:
    """A well-formed body with its content type, type, headers or message id missing or odd."""
    choice = rng.randrange(6)
    body = seed_update(task_id)
    if choice == 0:
        return Hostile("missing-properties", body, content_type=None)
    if choice == 1:
        return Hostile("missing-properties", body, headers=None)
    if choice == 2:
        return Hostile("missing-properties", body, kind=None, message_id=None)
    if choice == 3:
        odd = rng.choice(("2", 99, None, b"1", [1], True))
        return Hostile("missing-properties", body, headers={SCHEMA_HEADER: odd})
    if choice == 4:  # ids the broker carries but no fedmq id pattern accepts
        odd_id = rng.choice(("ééé", "a b", "x" * 255, "../../etc", "\u00b2\u00b3", "id\u0660"))
        return Hostile("missing-properties", body, message_id=odd_id)
    headers: dict[str, object] = {SCHEMA_HEADER: SCHEMA_VERSION, "x-fedmq-reason": "forged",
                                  "nested": {"deep": [1, "two", None]}}  # fmt: skip
    return Hostile("missing-properties", body, headers=headers)


def wrong_kind(rng: random.Random, task_id: str) -> Hostile:
    """A well-formed message of another kind (a heartbeat, a join) on the updates queue."""
    fields = {"schema": SCHEMA_VERSION, "kind": rng.choice(("heartbeat", "join_request",
              "global_model", "rejection", "no_such_kind")), "task_id": task_id}  # fmt: skip
    return Hostile("wrong-kind", _pack(fields), kind=str(fields["kind"]))


BUILDERS: tuple[Callable[[random.Random, str], Hostile], ...] = (
    random_bytes, truncated, bit_flipped, wrong_types, huge_shape, non_finite,
    enormous_declared_size, wrong_content_type, missing_properties, wrong_kind,
)  # fmt: skip
"""Every kind of hostile message, each as likely as the others."""


def hostile_join(rng: random.Random, task_id: str) -> Hostile:
    """A bad join request for the control exchange (the same families, and foreign tasks)."""
    if rng.random() < 0.2:
        body = _pack({"schema": SCHEMA_VERSION, "kind": "join_request",
                      "task_id": rng.choice(("elsewhere", task_id + "x")),
                      "trainer_id": "fuzz", "num_examples": 1})  # fmt: skip
        return Hostile("foreign-task", body, kind="join_request")
    message = rng.choice(BUILDERS)(rng, task_id)
    return Hostile(
        "join-" + message.label,
        message.body,
        kind="join_request",
        content_type=message.content_type,
        headers=message.headers,
        message_id=message.message_id,
    )


def damaged_full_update(rng: random.Random, body: bytes) -> Hostile:
    """A real full-size update cut short, or flipped within its first 16 bytes."""
    if rng.random() < 0.5:
        return Hostile("truncated-full", body[: rng.randrange(len(body))])
    damaged = bytearray(body)
    damaged[rng.randrange(16)] ^= 1 << rng.randrange(8)
    return Hostile("bit-flipped-full", bytes(damaged))


def overflowing_float64(template: ModelUpdate) -> bytes:
    """A shape-correct update whose float64 values are finite but overflow float32 (1e300)."""
    delta = tuple(
        Tensor(name=t.name, dtype="float64", shape=t.shape,
               data=np.full(t.shape, 1e300, np.float64).tobytes())
        for t in template.delta
    )  # fmt: skip
    return encode(template.model_copy(update={"delta": delta}))
