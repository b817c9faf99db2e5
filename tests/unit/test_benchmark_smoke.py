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
