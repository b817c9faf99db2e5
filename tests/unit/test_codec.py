"""The wire contract: every kind round-trips, every kind of bad input has its own reason."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas import (
    CONTENT_TYPE,
    SCHEMA_HEADER,
    SCHEMA_VERSION,
    DecodeError,
    DecodeReason,
    EvalReport,
    GlobalModel,
    Heartbeat,
    JoinAccepted,
    JoinRequest,
    ModelPublished,
    ModelUpdate,
    Rejection,
    TaskSpec,
    Tensor,
    TrainerJoined,
    TrainerLeft,
    check_envelope,
    decode,
    encode,
    signing_bytes,
)


def _tensor(name: str = "w", values: list[float] | None = None) -> Tensor:
    return Tensor.from_numpy(name, np.asarray(values or [1.0, -2.0, 3.5], dtype=np.float32))


def _update(**overrides: object) -> ModelUpdate:
    fields: dict[str, object] = {
        "task_id": "pneumonia",
        "trainer_id": "site-a",
        "base_version": 3,
        "num_examples": 120,
        "delta": (_tensor(),),
        "metrics": {"train_loss": 0.5},
    }
    fields.update(overrides)
    return ModelUpdate.model_validate(fields)


def _raw(body: dict[str, object]) -> bytes:
    return msgpack.packb({"schema": SCHEMA_VERSION, **body}, use_bin_type=True)


def _valid_update_fields() -> dict[str, object]:
    return _update().model_dump()


EVERY_KIND = [
    JoinRequest(task_id="t", trainer_id="a", num_examples=10),
    TaskSpec(task_id="t", model="cnn-small", num_classes=2),
    GlobalModel(task_id="t", version=4, tensors=(_tensor(),), updates_applied=7),
    JoinAccepted(
        spec=TaskSpec(task_id="t", model="resnet18", num_classes=2, precision="bfloat16"),
        model=GlobalModel(task_id="t", version=0, tensors=(_tensor(),)),
    ),
    _update(signature=b"s" * 64),
    Heartbeat(task_id="t", sender_id="a", role="trainer", model_version=3),
    TrainerJoined(task_id="t", trainer_id="a", num_examples=3),
    TrainerLeft(task_id="t", trainer_id="a", reason="heartbeat-timeout"),
    ModelPublished(task_id="t", version=2, updates_applied=5, updates_rejected=1),
    EvalReport(
        task_id="t",
        version=2,
        loss=0.3,
        accuracy=0.9,
        auc=0.95,
        per_class_accuracy=(0.8, 0.97),
        num_examples=624,
    ),
    Rejection(reason="stale", detail="staleness 9 > 5", task_id="t", update_id="u1"),
]


@pytest.mark.parametrize("message", EVERY_KIND, ids=lambda m: m.kind)
def test_every_message_kind_survives_a_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


def test_decode_returns_the_accepted_class() -> None:
    update = decode(encode(_update()), accept=(ModelUpdate,))
    assert isinstance(update, ModelUpdate)
    assert update.delta[0].to_numpy().tolist() == [1.0, -2.0, 3.5]


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float16, np.float64, np.int64, np.int32, np.uint8]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_tensors_of_any_allowed_dtype_and_shape_round_trip_exactly(array: np.ndarray) -> None:
    message = GlobalModel(task_id="t", version=1, tensors=(Tensor.from_numpy("x", array),))
    decoded = decode(encode(message), accept=(GlobalModel,))
    restored = decoded.tensors[0].to_numpy()
    assert restored.dtype == array.dtype
    assert restored.shape == array.shape
    np.testing.assert_array_equal(restored, array)


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=np.float32,
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=8),
        elements=st.floats(-(2.0**100), 2.0**100, width=32),
    )
)
def test_bfloat16_transport_keeps_every_value_within_its_relative_precision(
    array: np.ndarray,
) -> None:
    tensor = Tensor.from_numpy("x", array, precision="bfloat16")
    restored = decode(encode(GlobalModel(task_id="t", version=0, tensors=(tensor,))))
    values = restored.tensors[0].to_numpy()  # type: ignore[attr-defined]
    assert tensor.dtype == "bfloat16"
    assert tensor.nbytes == array.size * 2
    np.testing.assert_allclose(values, array, rtol=2**-8, atol=1e-38)


def test_float16_transport_halves_the_bytes_and_rounds_to_half_precision() -> None:
    array = np.array([0.1, 1000.5, -3.25], dtype=np.float32)
    tensor = Tensor.from_numpy("x", array, precision="float16")
    assert tensor.dtype == "float16"
    assert tensor.nbytes == 6
    np.testing.assert_array_equal(tensor.to_numpy(), array.astype(np.float16))


def test_integer_tensors_ignore_the_transport_precision() -> None:
    tensor = Tensor.from_numpy("bn.num_batches_tracked", np.array(7, np.int64), precision="float16")
    assert tensor.dtype == "int64"
    assert tensor.to_numpy().item() == 7


def test_decoded_tensor_is_a_zero_copy_view_of_the_message_bytes() -> None:
    decoded = decode(encode(_update()), accept=(ModelUpdate,))
    view = decoded.delta[0].to_numpy()
    assert not view.flags.owndata
    assert not view.flags.writeable


def test_encoding_is_deterministic_so_signatures_cover_stable_bytes() -> None:
    update = _update(signature=b"x" * 64)
    assert encode(update) == encode(ModelUpdate.model_validate(update.model_dump()))
    assert signing_bytes(update) == encode(update.model_copy(update={"signature": None}))
    assert signing_bytes(update) != encode(update)


def test_encoding_matches_plain_msgpack_for_large_tensors() -> None:
    update = _update(delta=(_tensor("big", [0.5] * 5000),))
    assert encode(update) == msgpack.packb(
        {"schema": SCHEMA_VERSION, **update.model_dump()}, use_bin_type=True
    )


def _reason_of(data: bytes, **kwargs: object) -> DecodeReason:
    with pytest.raises(DecodeError) as caught:
        decode(data, **kwargs)  # type: ignore[call-overload]
    assert caught.value.detail, "every rejection carries a human sentence"
    return caught.value.reason


def test_bytes_that_are_not_msgpack_are_refused_as_not_msgpack() -> None:
    assert _reason_of(b"\xc1\xc1\xc1") is DecodeReason.NOT_MSGPACK


def test_a_truncated_message_is_refused_as_truncated() -> None:
    assert _reason_of(encode(_update())[:-7]) is DecodeReason.TRUNCATED


def test_bytes_after_the_message_are_refused() -> None:
    assert _reason_of(encode(_update()) + b"\x00") is DecodeReason.TRAILING_BYTES


def test_msgpack_that_is_not_a_map_is_not_a_message() -> None:
    assert _reason_of(msgpack.packb([1, 2, 3])) is DecodeReason.NOT_A_MESSAGE


def test_an_unknown_kind_is_refused() -> None:
    assert _reason_of(_raw({"kind": "shutdown_everything"})) is DecodeReason.UNKNOWN_KIND


def test_a_kind_outside_the_accept_list_is_refused_as_wrong_kind() -> None:
    heartbeat = encode(Heartbeat(task_id="t", sender_id="a", role="trainer"))
    assert _reason_of(heartbeat, accept=(ModelUpdate,)) is DecodeReason.WRONG_KIND


def test_an_unknown_schema_version_is_refused() -> None:
    body = msgpack.packb({"schema": 99, **_valid_update_fields()}, use_bin_type=True)
    assert _reason_of(body) is DecodeReason.SCHEMA_VERSION


def test_a_missing_schema_version_is_refused() -> None:
    body = msgpack.packb(_valid_update_fields(), use_bin_type=True)
    assert _reason_of(body) is DecodeReason.SCHEMA_VERSION


def test_a_missing_field_is_refused_and_named() -> None:
    fields = _valid_update_fields()
    del fields["num_examples"]
    with pytest.raises(DecodeError) as caught:
        decode(_raw(fields))
    assert caught.value.reason is DecodeReason.INVALID_FIELD
    assert "num_examples" in caught.value.detail


def test_a_mistyped_field_is_refused_as_invalid() -> None:
    fields = _valid_update_fields() | {"base_version": "three"}
    assert _reason_of(_raw(fields)) is DecodeReason.INVALID_FIELD


def test_zero_examples_is_refused_because_it_would_weigh_nothing() -> None:
    fields = _valid_update_fields() | {"num_examples": 0}
    assert _reason_of(_raw(fields)) is DecodeReason.INVALID_FIELD


def test_an_unexpected_field_is_refused() -> None:
    fields = _valid_update_fields() | {"pickle": b"cos\nsystem\n"}
    assert _reason_of(_raw(fields)) is DecodeReason.INVALID_FIELD


def test_a_dtype_outside_the_allow_list_is_refused_as_bad_dtype() -> None:
    fields = _valid_update_fields()
    fields["delta"] = [{"name": "w", "dtype": "object", "shape": [3], "data": b"x" * 24}]
    assert _reason_of(_raw(fields)) is DecodeReason.BAD_DTYPE


def test_data_shorter_than_its_shape_is_refused_as_shape_mismatch() -> None:
    fields = _valid_update_fields()
    fields["delta"] = [{"name": "w", "dtype": "float32", "shape": [4], "data": b"\x00" * 12}]
    assert _reason_of(_raw(fields)) is DecodeReason.SHAPE_MISMATCH


def test_an_enormous_declared_shape_is_refused_without_allocating_it() -> None:
    fields = _valid_update_fields()
    huge = [2**31, 2**31, 2**31]
    fields["delta"] = [{"name": "w", "dtype": "float32", "shape": huge, "data": b"\x00" * 4}]
    assert _reason_of(_raw(fields)) is DecodeReason.SHAPE_MISMATCH


@pytest.mark.parametrize("shape", [[2**63 - 1, 0], [0, 2**40, 2**40], [2**64 - 1, 0, 2**64 - 1]])
def test_an_empty_tensor_declaring_an_enormous_dimension_is_refused(shape: list[int]) -> None:
    # Zero elements and no data pass the length check, but numpy cannot shape such a view:
    # accepted, it crashed the aggregator in `to_numpy` (found by tests/faults).
    fields = _valid_update_fields()
    fields["delta"] = [{"name": "w", "dtype": "float32", "shape": shape, "data": b""}]
    assert _reason_of(_raw(fields)) is DecodeReason.SHAPE_MISMATCH


def test_too_many_dimensions_are_refused_as_shape_mismatch() -> None:
    fields = _valid_update_fields()
    fields["delta"] = [{"name": "w", "dtype": "uint8", "shape": [1] * 9, "data": b"\x00"}]
    assert _reason_of(_raw(fields)) is DecodeReason.SHAPE_MISMATCH


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_a_tensor_is_refused_as_non_finite(bad: float) -> None:
    fields = _valid_update_fields()
    fields["delta"] = [
        {
            "name": "w",
            "dtype": "float32",
            "shape": [2],
            "data": np.array([1.0, bad], np.float32).tobytes(),
        }
    ]
    assert _reason_of(_raw(fields)) is DecodeReason.NON_FINITE


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_value_far_past_the_first_chunk_of_a_large_tensor_is_found(
    bad: float,
) -> None:
    values = np.zeros(300_000, np.float32)
    values[-1] = bad
    fields = _valid_update_fields()
    fields["delta"] = [
        {"name": "w", "dtype": "float32", "shape": [300_000], "data": values.tobytes()}
    ]
    assert _reason_of(_raw(fields)) is DecodeReason.NON_FINITE


def test_huge_finite_values_whose_squares_overflow_float32_are_accepted() -> None:
    values = np.full(100_000, 3e38, np.float32)
    tensor = Tensor(name="w", dtype="float32", shape=(100_000,), data=values.tobytes())
    assert tensor.to_numpy().max() == np.float32(3e38)


def test_nan_in_a_bfloat16_tensor_is_refused_as_non_finite() -> None:
    fields = _valid_update_fields()
    nan_bf16 = np.array([0x3F80, 0x7FC0], np.uint16).tobytes()
    fields["delta"] = [{"name": "w", "dtype": "bfloat16", "shape": [2], "data": nan_bf16}]
    assert _reason_of(_raw(fields)) is DecodeReason.NON_FINITE


def test_nan_in_the_metrics_is_refused_as_non_finite() -> None:
    fields = _valid_update_fields() | {"metrics": {"train_loss": math.nan}}
    assert _reason_of(_raw(fields)) is DecodeReason.NON_FINITE


def test_a_message_above_the_size_limit_is_refused_before_unpacking() -> None:
    body = encode(_update())
    assert _reason_of(body, max_bytes=len(body) - 1) is DecodeReason.OVERSIZED
    assert isinstance(decode(body, max_bytes=len(body)), ModelUpdate)


def test_a_delivery_without_the_msgpack_content_type_is_refused() -> None:
    with pytest.raises(DecodeError) as caught:
        check_envelope("application/python-pickle", {SCHEMA_HEADER: SCHEMA_VERSION})
    assert caught.value.reason is DecodeReason.CONTENT_TYPE


def test_a_delivery_without_properties_is_refused() -> None:
    with pytest.raises(DecodeError) as caught:
        check_envelope(None, None)
    assert caught.value.reason is DecodeReason.CONTENT_TYPE


def test_a_delivery_with_another_schema_header_is_refused() -> None:
    with pytest.raises(DecodeError) as caught:
        check_envelope(CONTENT_TYPE, {SCHEMA_HEADER: 2})
    assert caught.value.reason is DecodeReason.SCHEMA_VERSION
    check_envelope(CONTENT_TYPE, {SCHEMA_HEADER: SCHEMA_VERSION})


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_never_escape_as_anything_but_a_decode_error(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError as error:
        assert error.reason in DecodeReason


_DIMENSIONS = st.one_of(
    st.just(0), st.integers(1, 4), st.integers(0, 2**64 - 1),
    st.sampled_from([2**31, 2**40, 2**63 - 1]),
)  # fmt: skip
_ANY_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
    st.binary(max_size=16),
)  # fmt: skip


@st.composite
def _hostile_tensors(draw: st.DrawFn) -> dict[str, object]:
    shape = draw(st.lists(_DIMENSIONS, max_size=10))
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "bfloat16", "int64", "c8"]))
    size = draw(st.integers(0, 64))
    data = draw(st.one_of(st.just(b""), st.binary(min_size=size, max_size=size), _ANY_SCALAR))
    name = draw(st.one_of(st.just("w"), st.text(max_size=300)))
    return {"name": name, "dtype": dtype, "shape": shape, "data": data}


@settings(max_examples=400, deadline=None)
@given(
    tensors=st.lists(_hostile_tensors(), min_size=1, max_size=3),
    overrides=st.dictionaries(
        st.sampled_from(["base_version", "num_examples", "created_at", "metrics", "update_id"]),
        _ANY_SCALAR,
        max_size=2,
    ),
)
def test_structured_hostile_updates_decode_to_usable_tensors_or_a_decode_error(
    tensors: list[dict[str, object]], overrides: dict[str, object]
) -> None:
    """Hostile shapes, dtypes, sizes and field types: either a `DecodeError` with a reason,
    or an update every tensor of which numpy can view (what the aggregator does next)."""
    fields = _valid_update_fields()
    fields["delta"] = tensors
    fields.update(overrides)
    try:
        update = decode(_raw(fields), accept=(ModelUpdate,))
    except DecodeError as error:
        assert error.reason in DecodeReason
        return
    for tensor in update.delta:
        array = tensor.to_numpy()
        assert array.shape == tensor.shape
        if tensor.dtype in ("float32", "float64", "float16", "bfloat16"):
            assert np.isfinite(array).all()
