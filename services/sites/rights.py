"""What a site's broker user may do: least privilege for one trainer of one task.

The same rules `infra/rabbitmq/generate_definitions.py` writes for the simulated sites (a unit
test keeps the two equal); `fedmq site add` applies them to one real site.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from typing import Final

from services.common.topology import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    MODELS_EXCHANGE,
    UPDATES_EXCHANGE,
    follower_queue_name,
)

NOTHING: Final = "^$"
HASHING_ALGORITHM: Final = "rabbit_password_hashing_sha256"
SALT_BYTES: Final = 4


def alternatives(*names: str) -> str:
    """An anchored regex matching exactly `names` (escaped), nothing else."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def follower_permissions(task_id: str, follower: str) -> dict[str, str]:
    """A trainer or the evaluator: its own follower queue, and publish to three exchanges.

    `write` on the follower queue and `read` on `fedmq.models` are what binding the
    queue needs; `fedmq.updates` is writable (publish) but not readable (no binding to it).
    """
    own = follower_queue_name(task_id, follower)
    return {
        "configure": alternatives(own),
        "write": alternatives(UPDATES_EXCHANGE, CONTROL_EXCHANGE, EVENTS_EXCHANGE, own),
        "read": alternatives(MODELS_EXCHANGE, own),
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


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256` hash of `password` (random salt by default)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"RabbitMQ salts are {SALT_BYTES} bytes, got {len(salt)}")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")
