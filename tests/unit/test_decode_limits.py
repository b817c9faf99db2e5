"""Decode bounds sized from the model: bombs are refused before a single object is built."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import DecodeError, DecodeLimits, DecodeReason, ModelUpdate, Tensor, decode, encode
from schemas.limits import check_structure

CNN_LIKE = DecodeLimits.for_model(tensors=10, float_elements=420_000)
"""About the size of `cnn-small` (1.68 MB of float32 in 10 tensors)."""


def _update(shapes: list[tuple[int, ...]], dtype: str = "float32") -> ModelUpdate:
    delta = tuple(
        Tensor.from_numpy(f"layer{i}.weight", np.ones(shape, dtype))
        for i, shape in enumerate(shapes)
    )
    return ModelUpdate(
        task_id="t",
        trainer_id="site-a",
        base_version=3,
        num_examples=10,
        delta=delta,
        metrics={f"m{i}": 0.5 for i in range(32)},
    )


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), min_size=1, max_size=30
    ),
    dtype=st.sampled_from(["float32", "float64", "float16"]),
)
def test_every_update_of_the_model_fits_the_limits_derived_from_it(
    shapes: list[tuple[int, ...]], dtype: str
) -> None:
    # Given an update of a model with these tensors, in any accepted precision
    update = _update(shapes, dtype)
    elements = sum(int(np.prod(s)) for s in shapes)
    limits = DecodeLimits.for_model(tensors=len(shapes), float_elements=elements)
    # When it is decoded within the model's limits, then it comes back whole
    assert decode(encode(update), accept=(ModelUpdate,), limits=limits) == update


def test_a_sixteen_mebibyte_array_of_empty_maps_is_refused_by_its_size() -> None:
    body = b"\xdd" + (16 * 2**20).to_bytes(4, "big") + b"\x80" * (16 * 2**20)
    with pytest.raises(DecodeError) as caught:
        decode(body, limits=CNN_LIKE)
    assert caught.value.reason is DecodeReason.OVERSIZED


def test_a_long_array_within_the_byte_bound_is_refused_by_its_length() -> None:
    body = b"\xdd" + (3 * 2**20).to_bytes(4, "big") + b"\x80" * (3 * 2**20)
    with pytest.raises(DecodeError) as caught:
        decode(body, limits=CNN_LIKE)
    assert caught.value.reason is DecodeReason.TOO_COMPLEX
    assert "array of 3145728 entries" in caught.value.detail


def test_nested_containers_that_stay_under_every_length_bound_are_refused_by_their_count() -> None:
    # Given 64 x 64 x 64 x 12 empty maps (3 MiB, under the byte bound; no container over 64)
    leaf = b"\x9c" + b"\x80" * 12
    level3 = b"\xdc\x00\x40" + leaf * 64
    level2 = b"\xdc\x00\x40" + level3 * 64
    body = b"\xdc\x00\x40" + level2 * 64
    assert len(body) < CNN_LIKE.max_bytes
    # When it is decoded, then it is refused and nearly nothing was allocated
    tracemalloc.start()
    with pytest.raises(DecodeError) as caught:
        decode(body, limits=CNN_LIKE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert caught.value.reason is DecodeReason.TOO_COMPLEX
    assert peak < 1_000_000


def test_a_map_of_four_hundred_thousand_keys_is_refused_before_validation() -> None:
    keys = b"".join(b"\xa6k" + f"{i:05d}".encode()[-5:] + b"\xc0" for i in range(400_000))
    body = b"\xdf" + (400_000).to_bytes(4, "big") + keys
    with pytest.raises(DecodeError) as caught:
        decode(body, accept=(ModelUpdate,), limits=CNN_LIKE)
    assert caught.value.reason is DecodeReason.TOO_COMPLEX


def test_nesting_deeper_than_any_message_is_refused() -> None:
    body = b"\x91" * 7 + b"\xc0"
    with pytest.raises(DecodeError) as caught:
        check_structure(body, DecodeLimits())
    assert caught.value.reason is DecodeReason.TOO_COMPLEX


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xc7\x01\x05x", DecodeReason.NOT_MSGPACK),
        (b"\xd4\x05x", DecodeReason.NOT_MSGPACK),
        (b"\xc1", DecodeReason.NOT_MSGPACK),
        (b"\x82\xa1a", DecodeReason.TRUNCATED),
        (b"\xc6\xff\xff\xff\xff", DecodeReason.TOO_COMPLEX),
        (b"\xdb\x00\x00\x00\x09abc", DecodeReason.TRUNCATED),
    ],
)
def test_extensions_invalid_bytes_and_short_bodies_get_their_reason(
    body: bytes, reason: DecodeReason
) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(body, limits=CNN_LIKE)
    assert caught.value.reason is reason


def test_a_model_without_tensors_has_no_limits() -> None:
    with pytest.raises(ValueError, match="needs tensors"):
        DecodeLimits.for_model(tensors=0, float_elements=10)


def test_the_decode_bomb_benchmark_reports_the_bounded_refusal() -> None:
    from benchmarks.decode_bombs import measure

    result = measure("nested-3MB", "bounded")
    assert result["outcome"] == "too-complex" and result["bytes"] == 3_420_355
