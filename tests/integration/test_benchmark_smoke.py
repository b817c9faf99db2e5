"""Smoke runs of the broker benchmarks with tiny sizes: every number is there and sane."""

from __future__ import annotations

import pytest

from benchmarks import ingest, load, memory

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_the_ingest_benchmark_drains_every_update_and_compares_with_a_bare_consumer() -> None:
    report = ingest.main(
        ["--models", "cnn-small", "--updates", "8", "--strategies", "fedasync",
         "--cadences", "default"]
    )  # fmt: skip
    (row,) = report["results"]
    assert row["updates"] == 8 and row["rejected"] == 0
    assert 1 <= row["commits"] <= 8  # one commit may cover several FedAsync versions
    assert row["bare_updates_s"] > 0 and row["aggregator_updates_s"] > 0
    assert row["fraction_of_bare"] == pytest.approx(
        row["aggregator_updates_s"] / row["bare_updates_s"], rel=0.05
    )


def test_the_load_benchmark_matches_every_published_update_to_its_version() -> None:
    report = load.main(["--trainers", "3", "--duration", "3", "--period", "0.5"])
    (row,) = report["results"]
    assert row["published"] >= 3 and row["applied"] == row["published"]
    assert row["rejected"] == 0
    assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"] <= row["latency_max_ms"]
    assert row["peak_rss_mib"] >= row["rss_start_mib"] > 0


def test_the_memory_benchmark_reads_rss_after_every_chunk_of_updates() -> None:
    report = memory.main(["--models", "", "--trainers", "2", "--updates", "16"])
    assert report["by_model_and_buffer"] == []  # part 1 is covered by the unit fit test
    (trainers,) = report["by_trainers_and_updates"]
    assert trainers["rejected"] == 0
    assert sorted(trainers["rss_mib_by_updates"]) == [0, 4, 8, 12, 16]
