"""Operator commands that need no model: `fedmq topology`."""

from __future__ import annotations

import argparse
from typing import Any

from services.common.settings import ServiceSettings


def register(subcommands: Any) -> None:
    """Add `fedmq topology` to the CLI."""
    parser = subcommands.add_parser(
        "topology",
        help="declare the exchanges and queues of a task and show them",
        description="Idempotently declare fedmq's exchanges and a task's queues, then list them.",
    )
    parser.add_argument("--task-id", help="task whose queues to declare (default: FEDMQ_TASK_ID)")
    parser.add_argument(
        "--queue-type",
        choices=("classic", "quorum"),
        default="classic",
        help="queue type of the task's queues; quorum queues replicate on a cluster "
        "(default: classic)",
    )
    parser.set_defaults(func=run_topology)


def run_topology(args: argparse.Namespace) -> int:
    """Declare, then print a table of exchanges and queues with their depth."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from services.common.connect import bus_from_settings
    from services.common.topology import task_topology

    settings = ServiceSettings()
    task_id = args.task_id or settings.task_id
    topology = task_topology(task_id, queue_type=args.queue_type)
    console = Console()
    with bus_from_settings(settings) as bus:
        bus.declare(topology)
        exchanges = Table(title="Exchanges", title_justify="left")
        for column in ("exchange", "type", "durable"):
            exchanges.add_column(column)
        for exchange in topology.exchanges:
            exchanges.add_row(exchange.name, exchange.type, str(exchange.durable))
        queues = Table(title=f"Queues (task {task_id})", title_justify="left")
        for column in ("queue", "ready", "unacked", "bound to", "arguments"):
            queues.add_column(column)
        unacked = _unacked_counts(settings.amqp_url)
        for queue in topology.queues:
            # escaped: rich would read `[update.t.*]` as markup and drop the routing key
            bindings = escape(", ".join(f"{b.exchange} [{b.routing_key}]" for b in queue.bindings))
            arguments = ", ".join(f"{k}={v}" for k, v in sorted(queue.arguments.items()))
            in_flight = unacked.get(queue.name)
            queues.add_row(
                queue.name,
                str(bus.queue_depth(queue.name)),
                "n/a" if in_flight is None else str(in_flight),
                bindings,
                arguments,
            )
    console.print(exchanges)
    console.print(queues)
    console.print(f"declared on {_redacted(settings.amqp_url)}")
    return 0


def _unacked_counts(amqp_url: str) -> dict[str, int]:
    """Unacknowledged messages per queue, from the management API (empty when unreachable).

    AMQP tells a client only the ready count; what consumers hold is the broker's to say.
    """
    from urllib.parse import unquote, urlsplit

    from services.common.errors import FedmqError
    from services.sites.management import Management, quoted

    path = urlsplit(amqp_url).path
    vhost = unquote(path[1:]) if len(path) > 1 else "/"
    try:
        queues = Management.for_broker(amqp_url).get(f"queues/{quoted(vhost)}") or []
    except FedmqError:
        return {}
    return {q["name"]: int(q.get("messages_unacknowledged", 0)) for q in queues}


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
