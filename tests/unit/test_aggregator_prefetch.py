"""The aggregator's window of unacked updates: a byte budget, bounded, never below 2K."""

from __future__ import annotations

from services.aggregator.prefetch import (
    DEFAULT_PREFETCH_BYTES,
    MAX_PREFETCH,
    update_bytes,
    update_prefetch,
)
from services.aggregator.settings import AggregatorSettings

CNN_SMALL_FLOATS = 419_618
RESNET18_FLOATS = 11_170_000


def _window(floats: int, *, explicit: int | None = None, buffer_size: int = 1) -> int:
    return update_prefetch(
        explicit=explicit,
        budget_bytes=DEFAULT_PREFETCH_BYTES,
        message_bytes=update_bytes(floats, "float32"),
        buffer_size=buffer_size,
    )


def test_a_small_model_gets_a_wide_window_capped_at_the_maximum() -> None:
    assert _window(CNN_SMALL_FLOATS) == MAX_PREFETCH


def test_a_large_model_gets_as_many_updates_as_fit_in_the_byte_budget() -> None:
    window = _window(RESNET18_FLOATS)
    assert window == 12
    assert window * update_bytes(RESNET18_FLOATS, "float32") <= DEFAULT_PREFETCH_BYTES


def test_the_window_never_drops_below_twice_the_strategy_buffer() -> None:
    assert _window(RESNET18_FLOATS, buffer_size=10) == 20
    assert _window(CNN_SMALL_FLOATS, explicit=4, buffer_size=4) == 8


def test_an_explicit_prefetch_wins_over_the_byte_budget() -> None:
    assert _window(CNN_SMALL_FLOATS, explicit=16) == 16


def test_half_precision_updates_fit_twice_as_many() -> None:
    assert update_bytes(1000, "float16") == update_bytes(1000, "bfloat16") == 2000
    assert update_bytes(1000, "float32") == 4000


def test_the_settings_leave_the_window_to_the_byte_budget_by_default() -> None:
    settings = AggregatorSettings()
    assert settings.prefetch is None
    assert settings.prefetch_bytes == DEFAULT_PREFETCH_BYTES
