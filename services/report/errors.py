"""Errors raised while reading a run directory: each message names the file and what is wrong."""

from __future__ import annotations


class RunLogError(Exception):
    """Base class: a run directory cannot be reported on."""


class RunNotFound(RunLogError, FileNotFoundError):
    """The run directory, its manifest or its eval log does not exist."""


class InvalidRunLog(RunLogError, ValueError):
    """A manifest or an eval-log line does not parse or does not validate."""


class EmptyRunLog(RunLogError, ValueError):
    """The eval log holds no evaluation (of the requested split)."""
