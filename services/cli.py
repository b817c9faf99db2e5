"""`fedmq` console script: one sub-command per service or tool, each registered by its package.

Each package's `cli.py` exposes `register(subcommands)`; heavy imports (torch, pika) happen
inside the command functions so `fedmq --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "services.common.cli",
    "services.aggregator.cli",
    "services.trainer.cli",
    "services.evaluator.cli",
    "services.centralized.cli",
    "services.report.cli",
    "services.demo.cli",
    "services.export.cli",
    "services.security.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full `fedmq` parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="fedmq",
        description="Asynchronous federated learning for image classification over RabbitMQ.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise
            continue
        module.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedmq` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from services.common.memory import reuse_freed_memory

    reuse_freed_memory()
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
