"""Deterministic site partitions: IID, Dirichlet label skew, shards; summaries and table."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from services.common.data import describe, format_partition_table, partition
from services.common.data.partition import dirichlet, shards

LABELS = np.repeat(np.arange(4), [500, 300, 150, 50])  # 1000 examples, imbalanced


def _label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    classes = labels.max() + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    mixes = [np.bincount(labels[p], minlength=classes) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(m - overall).sum() for m in mixes]))


@pytest.mark.parametrize(
    "options",
    [{"scheme": "iid"}, {"scheme": "dirichlet", "alpha": 0.3}, {"scheme": "shards"}],
)
def test_partition_is_disjoint_covers_every_index_and_is_repeatable(
    options: dict[str, object],
) -> None:
    # When the same partition is asked for twice, and once with another seed
    first = partition(LABELS, num_sites=5, seed=3, **options)  # type: ignore[arg-type]
    again = partition(LABELS, num_sites=5, seed=3, **options)  # type: ignore[arg-type]
    other = partition(LABELS, num_sites=5, seed=4, **options)  # type: ignore[arg-type]

    # Then the parts are disjoint, cover all indices, and depend on the seed only
    joined = np.concatenate(first)
    assert len(first) == 5
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sites_differ_in_size_by_at_most_one() -> None:
    parts = partition(LABELS[:103], scheme="iid", num_sites=4, seed=0)

    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha() -> None:
    skewed = dirichlet(LABELS, 5, alpha=0.1, seed=0, min_size=10)
    near_iid = dirichlet(LABELS, 5, alpha=100.0, seed=0, min_size=10)

    assert _label_skew(skewed, LABELS) > 0.3
    assert _label_skew(near_iid, LABELS) < 0.1


def test_dirichlet_gives_every_site_at_least_min_size_examples() -> None:
    parts = dirichlet(LABELS, 10, alpha=0.1, seed=1, min_size=40)

    assert min(len(p) for p in parts) >= 40


def test_dirichlet_with_an_impossible_min_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot give 10 sites 101 each"):
        dirichlet(LABELS, 10, alpha=0.5, seed=0, min_size=101)


def test_shards_of_sorted_labels_give_each_site_few_classes() -> None:
    labels = np.repeat(np.arange(10), 100)

    parts = shards(labels, num_sites=10, shards_per_site=2, seed=0)

    assert all(len(p) == 100 for p in parts)
    assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_unknown_scheme_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="iid"):
        partition(LABELS, scheme="random", num_sites=2, seed=0)


def test_more_sites_than_examples_is_rejected() -> None:
    with pytest.raises(ValueError, match="3 examples cannot be split over 4 sites"):
        partition(np.array([0, 1, 0]), scheme="iid", num_sites=4, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=8, max_size=200),
    num_sites=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    scheme=st.sampled_from(["iid", "shards"]),
)
def test_any_labels_are_partitioned_into_a_disjoint_cover(
    labels: list[int], num_sites: int, seed: int, scheme: str
) -> None:
    y = np.asarray(labels)

    parts = partition(y, scheme=scheme, num_sites=num_sites, seed=seed, shards_per_site=1)

    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))


def test_describe_counts_each_class_per_site() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])

    summaries = describe([np.array([0, 3]), np.array([1, 2, 4, 5])], labels)

    assert [(s.site, s.size, s.class_counts) for s in summaries] == [
        (0, 2, (1, 0, 1)),
        (1, 4, (0, 2, 2)),
    ]


def test_partition_table_shows_one_row_per_site_with_counts_and_shares() -> None:
    summaries = describe([np.array([0, 1, 2]), np.array([3])], np.array([0, 1, 1, 1]))

    table = format_partition_table(summaries, class_names=["normal", "pneumonia"])

    console = Console(record=True, width=100)
    console.print(table)
    text = console.export_text()
    assert table.row_count == 2
    assert [c.header for c in table.columns] == ["site", "examples", "normal", "pneumonia"]
    assert "2 (67%)" in text and "1 (100%)" in text
