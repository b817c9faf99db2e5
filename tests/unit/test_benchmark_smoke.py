"""Smoke runs of the benchmark harnesses: correct output shape, not timing."""

from __future__ import annotations

from benchmarks import codec


def test_the_codec_benchmark_reports_rates_next_to_memcpy() -> None:
    report = codec.main(["--quick", "--repeats", "1"])
    assert report["benchmark"] == "codec"
    results = report["results"]
    assert isinstance(results, list) and len(results) == 1
    row = results[0]
    for key in ("encode_mib_s", "decode_mib_s", "memcpy_mib_s"):
        assert row[key] > 0
    assert row["message_mib"] > 0
    assert row["encode_vs_memcpy"] > 0 and row["decode_vs_memcpy"] > 0
    assert len(report["results_with_default_malloc"]) == 1


def test_the_aggregator_benchmark_applies_every_update_and_reports_a_ratio() -> None:
    from benchmarks import aggregator_apply

    report = aggregator_apply.main(["--quick"])
    rows = report["results"]
    assert isinstance(rows, list)
    assert {row["strategy"] for row in rows} == {"fedasync", "fedbuff"}
    by_strategy = {row["strategy"]: row for row in rows}
    assert by_strategy["fedasync"]["versions"] == 4  # one version per update
    assert by_strategy["fedbuff"]["versions"] == 1  # one version per buffer of 4
    assert all(row["aggregator_updates_s"] > 0 for row in rows)
