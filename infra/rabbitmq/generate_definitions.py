"""Write RabbitMQ definitions (topology, users, least-privilege permissions) for fedmq.

The topology comes from `services.common.topology` (the source of truth); this script
adds what code cannot declare: the vhost, one broker user per service and per trainer,
their permissions, and policies. Run from the repository root:

    uv run python infra/rabbitmq/generate_definitions.py dev      # regenerate the dev files
    uv run python infra/rabbitmq/generate_definitions.py build \
        --passwords-dir /secure/passwords --queue-type quorum --trainers 8 \
        --out /secure/definitions.json                             # production: random salts
    uv run python infra/rabbitmq/generate_definitions.py hash < password.txt

Password hashes follow `rabbit_password_hashing_sha256`: base64(salt + sha256(salt +
password)) with a 4-byte salt. The dev files use a salt derived from the user name so
that regenerating them gives the same bytes; production hashes use random salts.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from services.common.topology import (  # noqa: E402  (the repository root is added above)
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    MODELS_EXCHANGE,
    UPDATES_EXCHANGE,
    QueueType,
    control_queue,
    events_queue,
    follower_queue,
    follower_queue_name,
    task_topology,
    updates_queue,
)

VHOST: Final = "fedmq"
TASK_ID: Final = "pneumonia"
TRAINERS: Final = 8
"""Trainer users provisioned by default (`trainer-site-0` .. `trainer-site-7`)."""
TRAINER_PREFIX: Final = "trainer-site-"
AGGREGATOR_USER: Final = "aggregator"
"""Broker login of the aggregator; also its `aggregator_id` (its events queue name)."""
EVALUATOR_USER: Final = "evaluator"
"""Broker login of the evaluator; also its follower id (`fedmq.<task>.follow.evaluator`)."""
ADMIN_USER: Final = "fedmq-admin"
"""Operator login for the management console and `fedmq topology|watch`."""
HASHING_ALGORITHM: Final = "rabbit_password_hashing_sha256"
SALT_BYTES: Final = 4
DEFAULT_EXCHANGE_RESOURCE: Final = "amq.default"
"""Permission name of the default exchange: RPC replies go through it to a reply-to."""
NOTHING: Final = "^$"
POLICY_PRIORITY: Final = 10
"""Above 0 so an operator's ad-hoc policy (priority 0) does not silently replace ours."""

_ID: Final = "[A-Za-z0-9_-]+"
"""A task or trainer id inside a policy pattern (see `topology.validate_id`)."""

DEV_SECRETS: Final = REPO / "infra" / "secrets" / "dev"
COMPOSE_DEFINITIONS: Final = REPO / "infra" / "rabbitmq" / "definitions.json"
K8S_BASE: Final = REPO / "infra" / "k8s" / "base"
K8S_DEFINITIONS: Final = K8S_BASE / "rabbitmq" / "definitions.json"
K8S_HOST: Final = "fedmq-rabbitmq"
"""Client Service the cluster operator creates for the `RabbitmqCluster` named so."""


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256` hash of `password` (random salt by default)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"RabbitMQ salts are {SALT_BYTES} bytes, got {len(salt)}")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def dev_salt(user: str) -> bytes:
    """Deterministic salt for the published dev passwords (never for real ones)."""
    return hashlib.sha256(f"fedmq-dev-salt:{user}".encode()).digest()[:SALT_BYTES]


def trainer_user(index: int) -> str:
    """Broker login (and trainer id) of simulated site `index`."""
    return f"{TRAINER_PREFIX}{index}"


def _alternatives(*names: str) -> str:
    """An anchored regex matching exactly `names` (escaped), nothing else."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def aggregator_permissions(task_id: str) -> dict[str, str]:
    """Declare the shared topology and the task's queues, consume them, publish models."""
    task = task_topology(task_id)
    watch = events_queue(AGGREGATOR_USER, task_id).name
    exchanges = [e.name for e in task.exchanges]
    task_queues = [q.name for q in task.queues if q.name != DEAD_QUEUE]
    return {
        "configure": _alternatives(*exchanges, DEAD_QUEUE, *task_queues, watch),
        # write on a queue = bind it; on an exchange = publish (replies: the default one).
        "write": _alternatives(
            MODELS_EXCHANGE,
            EVENTS_EXCHANGE,
            DEAD_LETTER_EXCHANGE,
            DEFAULT_EXCHANGE_RESOURCE,
            DEAD_QUEUE,
            *task_queues,
            watch,
        ),
        # read on an exchange = bind a queue to it; on a queue = consume it.
        "read": _alternatives(
            UPDATES_EXCHANGE,
            CONTROL_EXCHANGE,
            EVENTS_EXCHANGE,
            DEAD_LETTER_EXCHANGE,
            *task_queues,
            watch,
        ),
    }


def follower_permissions(task_id: str, follower: str) -> dict[str, str]:
    """A trainer or the evaluator: its own follower queue, and publish to three exchanges.

    `write` on the follower queue and `read` on `fedmq.models` are what binding the
    queue needs; `fedmq.updates` is writable (publish) but not readable (no binding to it).
    """
    own = follower_queue_name(task_id, follower)
    return {
        "configure": _alternatives(own),
        "write": _alternatives(UPDATES_EXCHANGE, CONTROL_EXCHANGE, EVENTS_EXCHANGE, own),
        "read": _alternatives(MODELS_EXCHANGE, own),
    }


def evaluator_topic_permissions(task_id: str) -> list[dict[str, str]]:
    """The evaluator publishes its own heartbeats and its reports; it reads its task's models."""
    task, who = re.escape(task_id), re.escape(EVALUATOR_USER)
    return [
        {"exchange": UPDATES_EXCHANGE, "write": NOTHING, "read": NOTHING},
        {
            "exchange": EVENTS_EXCHANGE,
            "write": f"^(heartbeat\\.{task}\\.{who}|eval\\.{task})$",
            "read": NOTHING,
        },
        {"exchange": MODELS_EXCHANGE, "write": NOTHING, "read": f"^model\\.{task}$"},
    ]


def evaluator_permissions(task_id: str) -> dict[str, str]:
    """Like a trainer, but it never publishes updates."""
    own = follower_queue_name(task_id, EVALUATOR_USER)
    return {
        "configure": _alternatives(own),
        "write": _alternatives(CONTROL_EXCHANGE, EVENTS_EXCHANGE, own),
        "read": _alternatives(MODELS_EXCHANGE, own),
    }


def trainer_topic_permissions(task_id: str, trainer: str) -> list[dict[str, str]]:
    """Routing keys a trainer may use: only its own update and heartbeat keys, its task's models.

    Topic permissions are checked by the broker on publish (routing key vs `write`) and
    on binding a queue to a topic exchange (binding key vs `read`).
    """
    task, who = re.escape(task_id), re.escape(trainer)
    return [
        {"exchange": UPDATES_EXCHANGE, "write": f"^update\\.{task}\\.{who}$", "read": NOTHING},
        {
            "exchange": EVENTS_EXCHANGE,
            "write": f"^(heartbeat|trainer\\.left)\\.{task}\\.{who}$",
            "read": NOTHING,
        },
        {"exchange": MODELS_EXCHANGE, "write": NOTHING, "read": f"^model\\.{task}$"},
    ]


_POLICY_KEYS: Final = {
    "x-dead-letter-exchange": "dead-letter-exchange",
    "x-max-length": "max-length",
    "x-max-length-bytes": "max-length-bytes",
    "x-overflow": "overflow",
    "x-message-ttl": "message-ttl",
    "x-expires": "expires",
}
"""Queue argument -> policy key. `x-queue-type` has no policy equivalent."""


def policies(task_id: str) -> list[dict[str, Any]]:
    """Policies restating the queues' limits, so operators can tighten them live.

    Their values equal the declared `x-` arguments: code re-declares its queues with
    their arguments, so arguments cannot move out of the queues without the broker
    answering PRECONDITION_FAILED. Where both exist RabbitMQ applies the lower length,
    TTL and expiry, so lowering a policy value takes effect without re-declaring. The
    queue type is no policy: it is fixed when the queue is declared (`x-queue-type`).
    """
    topology = task_topology(task_id)
    limits = {
        f"^fedmq\\.{_ID}\\.updates$": ("fedmq-updates", topology.queue(updates_queue(task_id))),
        f"^fedmq\\.{_ID}\\.control$": ("fedmq-control", topology.queue(control_queue(task_id))),
        f"^fedmq\\.{_ID}\\.follow\\.{_ID}$": ("fedmq-followers", follower_queue(task_id, "x")),
        f"^{re.escape(DEAD_QUEUE)}$": ("fedmq-dead", topology.queue(DEAD_QUEUE)),
    }
    return [
        {
            "vhost": VHOST,
            "name": name,
            "pattern": pattern,
            "apply-to": "queues",
            "priority": POLICY_PRIORITY,
            "definition": {
                _POLICY_KEYS[k]: v for k, v in queue.arguments.items() if k in _POLICY_KEYS
            },
        }
        for pattern, (name, queue) in limits.items()
        if queue is not None
    ]


def build_definitions(
    *,
    passwords: dict[str, str],
    task_id: str = TASK_ID,
    queue_type: QueueType = "classic",
    trainers: int = TRAINERS,
    salt: Callable[[str], bytes | None] = lambda _user: None,
) -> dict[str, Any]:
    """The whole definitions document for one task; `passwords` maps user -> password."""
    topology = task_topology(task_id, queue_type=queue_type)
    trainer_users = [trainer_user(i) for i in range(trainers)]
    users = [ADMIN_USER, AGGREGATOR_USER, EVALUATOR_USER, *trainer_users]
    missing = [u for u in users if u not in passwords]
    if missing:
        raise ValueError(f"no password for {missing}")
    permissions = {
        ADMIN_USER: {"configure": ".*", "write": ".*", "read": ".*"},
        AGGREGATOR_USER: aggregator_permissions(task_id),
        EVALUATOR_USER: evaluator_permissions(task_id),
        **{t: follower_permissions(task_id, t) for t in trainer_users},
    }
    return {
        "users": [
            {
                "name": user,
                "password_hash": password_hash(passwords[user], salt=salt(user)),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": ["administrator"] if user == ADMIN_USER else [],
                "limits": {},
            }
            for user in users
        ],
        "vhosts": [{"name": VHOST, "description": "fedmq federated learning"}],
        "permissions": [{"user": u, "vhost": VHOST, **p} for u, p in permissions.items()],
        "topic_permissions": [
            *(
                {"user": t, "vhost": VHOST, **tp}
                for t in trainer_users
                for tp in trainer_topic_permissions(task_id, t)
            ),
            *(
                {"user": EVALUATOR_USER, "vhost": VHOST, **tp}
                for tp in evaluator_topic_permissions(task_id)
            ),
        ],
        "parameters": [],
        "global_parameters": [],
        "policies": policies(task_id),
        "exchanges": [
            {
                "name": e.name,
                "vhost": VHOST,
                "type": e.type,
                "durable": e.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for e in topology.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": VHOST,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": dict(q.arguments),
            }
            for q in topology.queues
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": VHOST,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for q in topology.queues
            for b in q.bindings
        ],
    }


def read_passwords(directory: Path, users: Iterable[str]) -> dict[str, str]:
    """`directory/<user>` or `directory/trainers/<user>` holds each password (one line)."""
    found = {}
    for user in users:
        candidates = (directory / user, directory / "trainers" / user)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no password file for {user!r} in {directory}")
        found[user] = path.read_text().strip()
    return found


def all_users(trainers: int) -> list[str]:
    """Every login the definitions create."""
    return [ADMIN_USER, AGGREGATOR_USER, EVALUATOR_USER, *map(trainer_user, range(trainers))]


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def _write_env(path: Path, values: dict[str, str]) -> None:
    lines = [f"{k}={v}" for k, v in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Generated by infra/rabbitmq/generate_definitions.py (dev only).\n"
        + "\n".join(lines)
        + "\n"
    )


def write_dev_files() -> None:
    """Regenerate every committed dev artifact from `infra/secrets/dev`."""
    passwords = read_passwords(DEV_SECRETS, all_users(TRAINERS))
    variants: tuple[tuple[Path, QueueType], ...] = (
        (COMPOSE_DEFINITIONS, "classic"),
        (K8S_DEFINITIONS, "quorum"),
    )
    for path, queue_type in variants:
        document = build_definitions(passwords=passwords, queue_type=queue_type, salt=dev_salt)
        _write_json(path, document)
    secrets = K8S_BASE / "secrets"
    trainer_passwords = {u: p for u, p in passwords.items() if u.startswith(TRAINER_PREFIX)}
    _write_env(secrets / "trainer-passwords.env", trainer_passwords)
    for scheme, port, path in (
        ("amqp", 5672, secrets / "amqp-urls.env"),
        ("amqps", 5671, REPO / "infra" / "k8s" / "overlays" / "tls" / "secrets" / "amqp-urls.env"),
    ):
        _write_env(
            path,
            {
                f"{user}-url": f"{scheme}://{user}:{passwords[user]}@{K8S_HOST}:{port}/{VHOST}"
                for user in (AGGREGATOR_USER, EVALUATOR_USER)
            },
        )


def main(argv: list[str] | None = None) -> int:
    """Command line: `dev`, `build` or `hash`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dev", help="regenerate the committed dev definitions and k8s env files")
    build = commands.add_parser("build", help="definitions from a directory of password files")
    build.add_argument("--passwords-dir", type=Path, required=True)
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--task-id", default=TASK_ID)
    build.add_argument("--queue-type", choices=("classic", "quorum"), default="quorum")
    build.add_argument("--trainers", type=int, default=TRAINERS)
    commands.add_parser("hash", help="print the password_hash of the password on stdin")
    args = parser.parse_args(argv)
    if args.command == "dev":
        write_dev_files()
    elif args.command == "build":
        passwords = read_passwords(args.passwords_dir, all_users(args.trainers))
        document = build_definitions(
            passwords=passwords,
            task_id=args.task_id,
            queue_type=args.queue_type,
            trainers=args.trainers,
        )
        _write_json(args.out, document)
    else:
        print(password_hash(sys.stdin.readline().rstrip("\n")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
