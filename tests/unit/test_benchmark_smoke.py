"""Smoke runs of the benchmark harnesses: correct output shape, not timing."""

from __future__ import annotations

import pytest

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


def test_the_precision_benchmark_halves_the_bytes_of_fp16_and_bf16_updates() -> None:
    from benchmarks import precision

    report = precision.main(["--skip-ingest", "--skip-accuracy", "--wire-models", "cnn-small"])
    rows = {r["precision"]: r for r in report["wire"]}
    assert rows["float32"]["fraction_of_float32"] == 1.0
    for half in ("float16", "bfloat16"):
        assert 0.49 < rows[half]["fraction_of_float32"] < 0.52


def test_load_latency_matches_the_kth_send_to_the_first_version_covering_it() -> None:
    from benchmarks.load import latencies

    sent = [0.3, 0.1, 0.2]  # publisher threads append out of order
    published = [(0.0, 0), (0.5, 2), (0.9, 3)]  # (time, updates applied)
    assert latencies(sent, published).round(3).tolist() == [0.4, 0.3, 0.6]


def test_the_memory_fit_recovers_a_known_model_times_buffer_law() -> None:
    from benchmarks.memory import fit_model_buffer

    rows = [
        {"model_mib": m, "buffer_size": k, "extra_mib": m * (3 + 2 * k)}
        for m in (1.6, 42.6)
        for k in (1, 4, 8)
    ]
    fit = fit_model_buffer(rows)
    assert fit["a_models"] == pytest.approx(3) and fit["b_models_per_buffered_update"] == 2
