"""Failures an operator can fix, each with its documented exit code and what to do about it.

Every `fedmq` command ends through one boundary (`services.cli.main`): an error from this
module, or a known foreign one translated by `services.common.boundary`, becomes one line on
stderr and its exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_FAILED = 1
"""The service failed while running (its log says why)."""
EXIT_USAGE = 2
"""A flag, setting or task file is wrong: fix the command line, the environment or the file."""
EXIT_REFUSED = 3
"""The aggregator refused this trainer's join request."""
EXIT_NO_DATA = 4
"""A data set, task file or key file named by the settings is not there."""
EXIT_BROKER_UNREACHABLE = 5
"""No RabbitMQ answered at the configured URL within the connect timeout."""
EXIT_BROKER_REFUSED = 6
"""RabbitMQ answered but refused the login, the permissions or the TLS handshake."""
EXIT_CHILD_DIED = 7
"""`fedmq demo`: one of the processes it started died."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT) before the command finished."""


class FedmqError(Exception):
    """A failure the operator can fix; `str()` is the one line shown, `hint` what to do."""

    exit_code: ClassVar[int] = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def line(self) -> str:
        """The message and the hint as one line."""
        text = str(self).replace("\n", " ")
        return f"{text}; {self.hint}" if self.hint else text


class UsageError(FedmqError):
    """A flag or setting value is invalid (out of range, unknown name, wrong type)."""

    exit_code = EXIT_USAGE


class TaskFileError(UsageError):
    """A task file cannot be read, is not YAML/JSON, or a field in it is invalid."""


class MissingInput(FedmqError):
    """A file or data set the settings name does not exist."""

    exit_code = EXIT_NO_DATA


class BrokerUnreachable(FedmqError):
    """No broker answered."""

    exit_code = EXIT_BROKER_UNREACHABLE


class BrokerRefused(FedmqError):
    """The broker refused the credentials, a permission, or the TLS handshake."""

    exit_code = EXIT_BROKER_REFUSED


class ChildDied(FedmqError):
    """A process started by `fedmq demo` exited before it was asked to."""

    exit_code = EXIT_CHILD_DIED
