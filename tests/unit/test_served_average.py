"""The served model's moving average of versions: decay per version, gaps, integer buffers."""

from __future__ import annotations

import numpy as np
import pytest

from services.evaluator.averaging import ServedAverage, VersionAverage


def test_the_average_moves_by_one_minus_decay_per_version_and_skips_count_as_versions() -> None:
    # Given an average with decay 0.5 that saw version 1 = zeros
    average = VersionAverage(decay=0.5)
    average.observe(np.zeros(2, np.float32), version=1)

    # When version 2 = ones, then version 4 = ones (version 3 never seen)
    after_2 = average.observe(np.ones(2, np.float32), version=2).copy()
    after_4 = average.observe(np.ones(2, np.float32), version=4)

    # Then it moved half-way, then as if 3 and 4 had both been ones
    np.testing.assert_allclose(after_2, [0.5, 0.5])
    np.testing.assert_allclose(after_4, [1 - 0.5**3, 1 - 0.5**3])


def test_an_older_or_repeated_version_leaves_the_average_alone() -> None:
    average = VersionAverage(decay=0.9)
    average.observe(np.ones(3, np.float32), version=5)
    # When version 5 again and version 4 arrive with other weights
    average.observe(np.zeros(3, np.float32), version=5)
    result = average.observe(np.zeros(3, np.float32), version=4)
    # Then nothing changed
    np.testing.assert_array_equal(result, np.ones(3, np.float32))


def test_served_average_averages_floats_and_keeps_the_newest_integer_buffers() -> None:
    # Given state arrays with a float weight and an integer counter
    served = ServedAverage(decay=0.75)
    served.observe({"w": np.zeros((2, 2), np.float32), "n": np.array(3)}, version=0)

    # When the next version arrives
    result = served.observe({"w": np.full((2, 2), 4.0, np.float32), "n": np.array(7)}, version=1)

    # Then the weight is a quarter of the way, the counter the newest
    np.testing.assert_allclose(result["w"], np.full((2, 2), 1.0))
    assert int(result["n"]) == 7


def test_a_decay_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="decay"):
        VersionAverage(decay=1.0)
