"""Translate the failures an operator can fix into `FedmqError`s with a line on what to do.

Used once, by `services.cli.main`; foreign exception types are looked up lazily so that a
command that never imported torch or pika does not import them here either.
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from services.common.errors import (
    BrokerRefused,
    BrokerUnreachable,
    FedmqError,
    MissingInput,
    UsageError,
)

BROKER_URL_HINT = "set --amqp-url or FEDMQ_AMQP_URL"
START_A_BROKER = (
    "start RabbitMQ (docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management) "
    f"or {BROKER_URL_HINT} to one that runs"
)


def explain(error: BaseException) -> FedmqError | None:
    """The operator-facing form of `error`, or None when it is a bug (keep the traceback)."""
    if isinstance(error, FedmqError):
        return error
    if isinstance(error, ValidationError):
        return UsageError(validation_line(error), hint="see --help for the allowed values")
    transport = _transport_error(error)
    if transport is not None:
        return transport
    if _is_instance(error, "services.common.models.zoo", "UnknownModel"):
        return UsageError(str(error))
    if _is_instance(error, "services.common.data.dataset", "DatasetError"):
        return MissingInput(str(error), hint="set --data-dir or --data-source to where it is")
    if isinstance(error, FileNotFoundError):
        return MissingInput(f"{error.filename or error} does not exist")
    return None


def validation_line(error: ValidationError) -> str:
    """`field: problem (got value)` for each invalid field, on one line."""
    problems = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or error.title
        if error.title.endswith("Settings") and len(item["loc"]) == 1:
            # A settings field is set by a flag or a variable: name both.
            field += f" (--{field.replace('_', '-')} or FEDMQ_{field.upper()})"
        got = item.get("input")
        shown = "" if item["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{field}: {item['msg']}{shown}")
    return f"invalid {error.title}: " + "; ".join(problems)


def _transport_error(error: BaseException) -> FedmqError | None:
    if not _is_instance(error, "services.common.bus.errors", "TransportError"):
        return None
    from services.common.bus.errors import AccessRefused, ConnectionLost, TlsError

    if isinstance(error, AccessRefused):
        return BrokerRefused(str(error), hint=f"fix the user or password and {BROKER_URL_HINT}")
    if isinstance(error, TlsError):
        return BrokerRefused(str(error))
    if isinstance(error, ConnectionLost):
        return BrokerUnreachable(str(error), hint=START_A_BROKER)
    return None


def _is_instance(error: BaseException, module: str, name: str) -> bool:
    loaded = sys.modules.get(module)
    kind = getattr(loaded, name, None)
    return isinstance(kind, type) and isinstance(error, kind)
