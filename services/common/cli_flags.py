"""Command-line flags that override `FEDMQ_*` settings fields, shared by the services."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SettingFlag = tuple[str, str, type, str]
"""(flag, settings field, type, help)."""

COMMON_FLAGS: tuple[SettingFlag, ...] = (
    ("--amqp-url", "amqp_url", str, "broker URL (default: FEDMQ_AMQP_URL)"),
    (
        "--amqp-urls",
        "amqp_urls",
        str,
        "comma-separated URLs of a cluster's nodes (FEDMQ_AMQP_URLS)",
    ),
    ("--data-source", "data_source", str, "medmnist:<name> or folder:<path>"),
    ("--data-dir", "data_dir", Path, "directory holding MedMNIST .npz files"),
    ("--torch-threads", "torch_threads", int, "intra-op threads for torch (default 1)"),
    ("--join-timeout", "join_timeout", float, "seconds to keep asking to join"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING, ERROR"),
)


def add_setting_flags(
    parser: argparse.ArgumentParser,
    flags: Sequence[SettingFlag],
    *,
    choices: Mapping[str, tuple[str, ...]] | None = None,
) -> None:
    """Add one optional flag per settings field (absent flags leave the environment's value)."""
    for flag, field, kind, text in flags:
        parser.add_argument(flag, type=kind, help=text, choices=(choices or {}).get(field))


def given_settings(args: argparse.Namespace, flags: Sequence[SettingFlag]) -> dict[str, Any]:
    """The settings fields whose flags were given, ready to lay over the environment."""
    values = {field: getattr(args, field) for _flag, field, _kind, _help in flags}
    return {field: value for field, value in values.items() if value is not None}
