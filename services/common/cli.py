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
    parser.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    parser.set_defaults(func=run_topology)


def run_topology(args: argparse.Namespace) -> int:
    """Declare, then print a table of exchanges and queues with their depth."""
    from rich.console import Console
    from rich.table import Table

    from services.common.bus import TransportError
    from services.common.connect import bus_from_settings
    from services.common.topology import task_topology

    settings = ServiceSettings()
    task_id = args.task_id or settings.task_id
    topology = task_topology(task_id, queue_type=args.queue_type)
    console = Console()
    try:
        bus = bus_from_settings(settings)
    except TransportError as error:
        console.print(f"[red]cannot reach RabbitMQ at {_redacted(settings.amqp_url)}:[/] {error}")
        console.print(HOW_TO_START_A_BROKER)
        return 2
    with bus:
        bus.declare(topology)
        exchanges = Table(title="Exchanges", title_justify="left")
        for column in ("exchange", "type", "durable"):
            exchanges.add_column(column)
        for exchange in topology.exchanges:
            exchanges.add_row(exchange.name, exchange.type, str(exchange.durable))
        queues = Table(title=f"Queues (task {task_id})", title_justify="left")
        for column in ("queue", "ready", "bound to", "arguments"):
            queues.add_column(column)
        for queue in topology.queues:
            bindings = ", ".join(f"{b.exchange} [{b.routing_key}]" for b in queue.bindings)
            arguments = ", ".join(f"{k}={v}" for k, v in sorted(queue.arguments.items()))
            queues.add_row(queue.name, str(bus.queue_depth(queue.name)), bindings, arguments)
    console.print(exchanges)
    console.print(queues)
    console.print(f"declared on {_redacted(settings.amqp_url)}")
    return 0


HOW_TO_START_A_BROKER = (
    "Start one with Docker:  docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management\n"
    "or a package manager:   apt-get install rabbitmq-server  (then: rabbitmq-server -detached)\n"
    "and point FEDMQ_AMQP_URL at it (default amqp://guest:guest@localhost:5672/%2F)."
)


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
