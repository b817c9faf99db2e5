"""`fedmq trainer`: one site's trainer; flags override `FEDMQ_*` environment settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.common.cli_flags import COMMON_FLAGS, SettingFlag, add_setting_flags, given_settings
from services.trainer.settings import TrainerSettings

_FLAGS: tuple[SettingFlag, ...] = (
    *COMMON_FLAGS,
    ("--task-id", "task_id", str, "task to join"),
    ("--trainer-id", "trainer_id", str, "this site's id"),
    ("--site-index", "site_index", int, "simulation: train on part i of --num-sites"),
    ("--num-sites", "num_sites", int, "simulation: number of parts the data is split into"),
    ("--partition", "partition", str, "simulation: iid, dirichlet or shards"),
    ("--dirichlet-alpha", "dirichlet_alpha", float, "simulation: label skew (small = strong)"),
    ("--partition-seed", "partition_seed", int, "simulation: same on every site"),
    ("--seed", "seed", int, "seed of the data order (reproducible updates)"),
    (
        "--simulated-slowdown",
        "simulated_slowdown",
        float,
        "SIMULATION AID for straggler experiments: run this many times slower (>= 1)",
    ),
    ("--max-updates", "max_updates", int, "leave after sending this many updates"),
    ("--signing-key-file", "signing_key_file", Path, "Ed25519 private key signing updates"),
)
_CHOICES: dict[str, tuple[str, ...]] = {"partition": ("iid", "dirichlet", "shards")}


def register(subcommands: Any) -> None:
    """Add `fedmq trainer` to the CLI."""
    parser = subcommands.add_parser(
        "trainer",
        help="train on this site's data and send updates",
        description=(
            "Join a task, train locally from the newest global model, publish each delta. "
            "SIGTERM/SIGINT: stop after the current batch, announce leaving, exit 0."
        ),
    )
    add_setting_flags(parser, _FLAGS, choices=_CHOICES, model=TrainerSettings)
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> TrainerSettings:
    """Environment settings with the flags that were given laid on top.

    Raises `pydantic.ValidationError` for a missing trainer id or a value out of range.
    """
    return TrainerSettings(**given_settings(args, _FLAGS))


def run(args: argparse.Namespace) -> int:
    """Run the trainer until it is stopped or has sent `--max-updates` updates."""
    from services.common.connect import bus_from_settings
    from services.common.logging import configure_logging
    from services.common.metrics import readings_registry, serve_metrics
    from services.common.signals import on_termination
    from services.trainer.local_round import set_torch_threads
    from services.trainer.service import TrainerService

    settings = settings_from_args(args)
    configure_logging(level=settings.log_level, json=settings.log_json)
    set_torch_threads(settings.torch_threads)
    if settings.simulated_slowdown > 1.0:
        import structlog

        structlog.get_logger(__name__).warning(
            "SIMULATION AID active: training is slowed down on purpose",
            simulated_slowdown=settings.simulated_slowdown,
        )
    bus = bus_from_settings(settings)
    service = TrainerService(settings, bus=bus)
    counters = {
        "fedmq_trainer_updates_sent": ("Updates the broker confirmed", lambda: service.updates_sent)
    }
    serve_metrics(readings_registry(settings.task_id, counters=counters), settings.metrics_port)
    on_termination(service.stop)
    try:
        return service.run()
    finally:
        bus.close()
