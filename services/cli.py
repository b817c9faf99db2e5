"""`fedmq` console script: one sub-command per service or tool, each registered by its package.

Each package's `cli.py` exposes `register(subcommands)`; heavy imports (torch, pika) happen
inside the command functions so `fedmq --help` stays fast. Every command ends here: a failure
the operator can fix is one line on stderr and a documented exit code (`services.common.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from services.common.errors import EXIT_INTERRUPTED, EXIT_USAGE

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
    "services.sites.cli",
)
EXIT_CODES_EPILOG = (
    "exit codes: 0 done, 1 failed while running (see the log), 2 bad flag/setting/task file, "
    "3 join refused, 4 missing data or file, 5 broker unreachable, 6 broker refused the login "
    "or TLS, 7 a demo process died, 130 interrupted"
)
_AMQP_URL_DEST = "_amqp_url_flag"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at `--help`."""

    def error(self, message: str) -> NoReturn:
        """Print `fedmq COMMAND: error: ...` and exit with `EXIT_USAGE`."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fedmq_version() -> str:
    """`fedmq <version> (Python x.y.z)`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("fedmq")
    except PackageNotFoundError:
        installed = "unknown"
    return f"fedmq {installed} (Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    """The full `fedmq` parser with every available sub-command."""
    parser = OneLineParser(
        prog="fedmq",
        description="Asynchronous federated learning for image classification over RabbitMQ.",
        epilog=EXIT_CODES_EPILOG,
    )
    parser.add_argument("--version", action="version", version=fedmq_version())
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise
            continue
        module.register(subcommands)
    for command in subcommands.choices.values():
        _add_common_options(command)
    return parser


def _add_common_options(command: argparse.ArgumentParser) -> None:
    """`--version` and `--amqp-url` on every command, and the exit codes under its help."""
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):  # `fedmq site add`, ...
            for nested in action.choices.values():
                _add_common_options(nested)
    options = {option for action in command._actions for option in action.option_strings}
    if "--version" not in options:  # a command may use it for a model version
        command.add_argument("--version", action="version", version=fedmq_version())
    if "--amqp-url" not in options:
        command.add_argument(
            "--amqp-url",
            dest=_AMQP_URL_DEST,
            metavar="AMQP_URL",
            help="broker URL, amqp://user:password@host:port/vhost or amqps:// for TLS "
            "(default: amqp://guest:guest@localhost:5672/%%2F; env FEDMQ_AMQP_URL)",
        )
    command.epilog = command.epilog or EXIT_CODES_EPILOG


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedmq` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _apply_common_options(args)
    from services.common.memory import reuse_freed_memory

    reuse_freed_memory()
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:
        from services.common.boundary import explain

        failure = explain(error)
        if failure is None:
            raise
        print(f"fedmq {args.command}: error: {failure.line()}", file=sys.stderr)
        return failure.exit_code
    return int(result or 0)


def _apply_common_options(args: Any) -> None:
    # Commands that read ServiceSettings() themselves (and the processes the demo starts)
    # see the flag as the variable it overrides.
    url = getattr(args, _AMQP_URL_DEST, None)
    if url:
        os.environ["FEDMQ_AMQP_URL"] = url
    # pika logs each failed connection attempt with a traceback; the bus reports it in one
    # line. `configure_logging(level="DEBUG")` shows pika's lines again.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


if __name__ == "__main__":
    sys.exit(main())
