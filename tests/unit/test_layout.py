"""ParamLayout: the flat float32 vector, mismatch errors, integer counters, FedBN mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.aggregator.layout import LayoutMismatch, ParamLayout

ENTRIES = [
    ("conv.weight", "float32", (2, 2)),
    ("bn.weight", "float32", (2,)),
    ("bn.bias", "float32", (2,)),
    ("bn.running_mean", "float32", (2,)),
    ("bn.running_var", "float32", (2,)),
    ("bn.num_batches_tracked", "int64", ()),
    ("fc.weight", "float16", (1, 2)),
    ("fc.bias", "bfloat16", (1,)),
]


def make_layout(*, bn_prefixes: tuple[str, ...] = ("bn",)) -> ParamLayout:
    return ParamLayout.from_entries(ENTRIES, bn_prefixes=bn_prefixes)


def make_arrays() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.array([[1, 2], [3, 4]], dtype=np.float32),
        "bn.weight": np.array([5, 6], dtype=np.float32),
        "bn.bias": np.array([7, 8], dtype=np.float32),
        "bn.running_mean": np.array([9, 10], dtype=np.float32),
        "bn.running_var": np.array([11, 12], dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "fc.weight": np.array([[13, 14]], dtype=np.float16),
        # bfloat16 arrives already widened to float32 by the codec.
        "fc.bias": np.array([15], dtype=np.float32),
    }


def test_float_entries_occupy_consecutive_slices_in_state_dict_order() -> None:
    layout = make_layout()

    assert layout.size == 15
    assert dict(layout.offsets) == {
        "conv.weight": 0,
        "bn.weight": 4,
        "bn.bias": 6,
        "bn.running_mean": 8,
        "bn.running_var": 10,
        "fc.weight": 12,
        "fc.bias": 14,
    }
    assert layout.slices["fc.weight"] == slice(12, 14)


def test_flatten_then_unflatten_round_trips_every_float_tensor() -> None:
    layout = make_layout()
    arrays = make_arrays()

    vector = layout.flatten(arrays)
    restored = layout.unflatten(vector)

    np.testing.assert_array_equal(vector, np.arange(1, 16, dtype=np.float32))
    assert list(restored) == list(layout.float_names)
    for name, array in restored.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, arrays[name].astype(np.float32))


def test_unflatten_returns_views_of_the_vector_not_copies() -> None:
    layout = make_layout()
    vector = layout.flatten(make_arrays())

    restored = layout.unflatten(vector)
    vector[0] = -1.0

    assert restored["conv.weight"][0, 0] == -1.0


def test_integer_counters_are_outside_the_vector_and_carried_through_untouched() -> None:
    layout = make_layout()
    arrays = make_arrays()

    vector = layout.flatten(arrays)
    counters = {name: arrays[name] for name in layout.integer_names}
    restored = layout.unflatten(vector * np.float32(2), integers=counters)

    assert layout.integer_names == ("bn.num_batches_tracked",)
    assert "bn.num_batches_tracked" not in layout.slices
    assert restored["bn.num_batches_tracked"].dtype == np.int64
    assert int(restored["bn.num_batches_tracked"]) == 7
    assert list(restored) == list(layout.names)


def test_a_missing_tensor_is_named_in_the_mismatch() -> None:
    layout = make_layout()
    arrays = make_arrays()
    del arrays["fc.bias"]

    with pytest.raises(LayoutMismatch, match=r"'fc\.bias' is missing"):
        layout.flatten(arrays)


def test_a_wrong_shape_is_named_in_the_mismatch() -> None:
    layout = make_layout()
    arrays = make_arrays()
    arrays["conv.weight"] = np.zeros((4,), dtype=np.float32)

    with pytest.raises(LayoutMismatch) as caught:
        layout.flatten(arrays)

    assert "'conv.weight'" in caught.value.detail
    assert "(4,)" in caught.value.detail
    assert "(2, 2)" in caught.value.detail


def test_an_unknown_tensor_is_named_in_the_mismatch() -> None:
    layout = make_layout()
    arrays = make_arrays()
    arrays["head.weight"] = np.zeros((1,), dtype=np.float32)

    with pytest.raises(LayoutMismatch, match=r"'head\.weight' is not part of the model"):
        layout.flatten(arrays)


def test_an_integer_array_for_a_float_tensor_is_a_mismatch() -> None:
    layout = make_layout()
    arrays = make_arrays()
    arrays["bn.bias"] = np.array([7, 8], dtype=np.int64)

    with pytest.raises(LayoutMismatch, match=r"'bn\.bias' has dtype int64"):
        layout.flatten(arrays)


def test_unflatten_refuses_a_vector_of_the_wrong_length() -> None:
    layout = make_layout()

    with pytest.raises(LayoutMismatch, match=r"\(15,\)"):
        layout.unflatten(np.zeros(14, dtype=np.float32))


def test_batchnorm_mask_covers_bn_weights_biases_and_running_statistics() -> None:
    layout = make_layout()

    mask = layout.batchnorm_mask()

    expected = np.zeros(15, dtype=bool)
    expected[4:12] = True
    np.testing.assert_array_equal(mask, expected)


def test_without_bn_prefixes_only_running_statistics_are_recognised_as_batchnorm() -> None:
    layout = make_layout(bn_prefixes=())

    mask = layout.batchnorm_mask()

    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(8, 12))


def test_fedbn_aggregation_mask_zeroes_batchnorm_entries_of_a_delta() -> None:
    layout = make_layout()
    delta = np.arange(1, 16, dtype=np.float32)

    masked = delta * layout.aggregation_mask(fedbn=True)
    unmasked = delta * layout.aggregation_mask(fedbn=False)

    np.testing.assert_array_equal(masked[4:12], np.zeros(8, dtype=np.float32))
    np.testing.assert_array_equal(masked[:4], delta[:4])
    np.testing.assert_array_equal(masked[12:], delta[12:])
    np.testing.assert_array_equal(unmasked, delta)


def test_a_bn_prefix_matching_no_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="'bn2'"):
        ParamLayout.from_entries(ENTRIES, bn_prefixes=("bn2",))


def test_duplicate_tensor_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'a' appears twice"):
        ParamLayout.from_entries([("a", "float32", (1,)), ("a", "float32", (2,))])


def test_from_arrays_reads_names_dtypes_and_shapes_from_numpy() -> None:
    arrays = make_arrays()
    arrays["fc.bias"] = np.array([15], dtype=np.float32)

    layout = ParamLayout.from_arrays(arrays, bn_prefixes=("bn",))

    assert layout.entries[5].dtype == "int64"
    assert layout.entries[6].dtype == "float16"
    assert layout.size == 15
    np.testing.assert_array_equal(layout.flatten(arrays), np.arange(1, 16, dtype=np.float32))


shapes = st.lists(
    st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=5,
)


@given(shapes=shapes, seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_flatten_unflatten_round_trips_for_any_shapes(
    shapes: list[tuple[int, ...]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    arrays = {
        f"t{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(shapes)
    }
    layout = ParamLayout.from_arrays(arrays)

    restored = layout.unflatten(layout.flatten(arrays))

    assert layout.size == sum(a.size for a in arrays.values())
    for name, array in arrays.items():
        np.testing.assert_array_equal(restored[name], array)
