"""Which exchanges, queues and routing keys exist: a declarative description, no I/O.

A bus turns a `Topology` into broker declarations; `infra/rabbitmq/definitions.json`
mirrors `shared_topology()` for operators.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, TypeVar

ExchangeType = Literal["topic", "direct", "fanout"]
QueueType = Literal["classic", "quorum"]
EventType = Literal[
    "heartbeat",
    "trainer.joined",
    "trainer.left",
    "model.published",
    "eval",
    "update.rejected",
]

UPDATES_EXCHANGE: Final = "fedmq.updates"
MODELS_EXCHANGE: Final = "fedmq.models"
CONTROL_EXCHANGE: Final = "fedmq.control"
EVENTS_EXCHANGE: Final = "fedmq.events"
DEAD_LETTER_EXCHANGE: Final = "fedmq.dlx"
DEAD_QUEUE: Final = "fedmq.dead"

REASON_HEADER: Final = "x-fedmq-reason"
DETAIL_HEADER: Final = "x-fedmq-detail"
ORIGINAL_EXCHANGE_HEADER: Final = "x-fedmq-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER: Final = "x-fedmq-original-routing-key"
# The broker refuses a `user_id` that is not the publisher's login, so a dead-lettered
# copy published by the aggregator carries the sender's identity in this header instead.
ORIGINAL_USER_ID_HEADER: Final = "x-fedmq-original-user-id"

_DAY_MS: Final = 24 * 60 * 60 * 1000
GIB: Final = 1024**3

DEAD_MESSAGE_TTL_MS: Final = 7 * _DAY_MS
"""How long a dead letter stays in `fedmq.dead` for an operator to inspect."""
DEAD_QUEUE_MAX_LENGTH: Final = 100_000
"""At most this many dead letters are kept; the oldest are dropped first."""
DEAD_QUEUE_MAX_BYTES: Final = 4 * GIB
"""Bound on the bodies kept in `fedmq.dead`: rejected updates can be large."""
DEFAULT_MAX_UPDATE_BYTES: Final = 1 * GIB
"""Bytes of updates a task's queue holds before publishers are refused (back-pressure)."""
CONTROL_MESSAGE_TTL_MS: Final = 60_000
"""A join request nobody answered within a minute is dropped: its caller gave up."""
FOLLOWER_QUEUE_EXPIRES_MS: Final = 1 * _DAY_MS
"""A follower queue nobody used for a day is deleted by the broker."""
WATCH_QUEUE_EXPIRES_MS: Final = 10 * 60 * 1000
"""An events queue of a watcher that went away is deleted after ten minutes."""
WATCH_QUEUE_MAX_LENGTH: Final = 10_000
"""A slow watcher keeps only the newest events."""

_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ExchangeSpec:
    """One exchange to declare."""

    name: str
    type: ExchangeType
    durable: bool = True


@dataclass(frozen=True)
class BindingSpec:
    """Bind the enclosing queue to `exchange` with `routing_key` (a pattern for topics)."""

    exchange: str
    routing_key: str


@dataclass(frozen=True)
class QueueSpec:
    """One queue to declare, with its `x-` arguments and bindings."""

    name: str
    durable: bool
    arguments: Mapping[str, object] = field(default_factory=dict, hash=False)
    bindings: tuple[BindingSpec, ...] = ()
    exclusive: bool = False
    auto_delete: bool = False

    def __post_init__(self) -> None:
        # A read-only copy: a spec shared between declarations must not be mutated.
        object.__setattr__(self, "arguments", MappingProxyType(dict(self.arguments)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueueSpec):
            return NotImplemented
        return (
            self.name == other.name
            and self.durable == other.durable
            and dict(self.arguments) == dict(other.arguments)
            and self.bindings == other.bindings
            and self.exclusive == other.exclusive
            and self.auto_delete == other.auto_delete
        )

    def __hash__(self) -> int:
        return hash((self.name, self.durable, self.bindings, self.exclusive, self.auto_delete))


@dataclass(frozen=True)
class Topology:
    """A set of exchanges and queues; merge topologies to declare them together."""

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()

    def __post_init__(self) -> None:
        _check_unique(self.exchanges)
        _check_unique(self.queues)

    def merge(self, other: Topology) -> Topology:
        """Union of both topologies; the same name with two different specs is a ValueError."""
        return Topology(
            exchanges=_union(self.exchanges, other.exchanges),
            queues=_union(self.queues, other.queues),
        )

    def exchange(self, name: str) -> ExchangeSpec | None:
        """The exchange called `name`, if any."""
        return next((e for e in self.exchanges if e.name == name), None)

    def queue(self, name: str) -> QueueSpec | None:
        """The queue called `name`, if any."""
        return next((q for q in self.queues if q.name == name), None)


def _check_unique(specs: Iterable[ExchangeSpec | QueueSpec]) -> None:
    seen: dict[str, ExchangeSpec | QueueSpec] = {}
    for spec in specs:
        known = seen.setdefault(spec.name, spec)
        if known != spec:
            raise ValueError(f"{spec.name!r} is declared twice with different settings")


_Spec = TypeVar("_Spec", ExchangeSpec, QueueSpec)


def _union(mine: tuple[_Spec, ...], theirs: tuple[_Spec, ...]) -> tuple[_Spec, ...]:
    merged = {spec.name: spec for spec in mine}
    for spec in theirs:
        known = merged.setdefault(spec.name, spec)
        if known != spec:
            raise ValueError(
                f"cannot merge topologies: {spec.name!r} has different settings "
                f"({known!r} vs {spec!r})"
            )
    return tuple(merged.values())


def validate_id(value: str, *, what: str = "id") -> str:
    """Return `value` if it is a valid task/trainer id (`[A-Za-z0-9_-]{1,64}`), else ValueError.

    Ids end up in queue names and routing keys, where `.`, `*` and `#` have a meaning.
    """
    if not isinstance(value, str) or _ID_PATTERN.fullmatch(value) is None:
        raise ValueError(
            f"invalid {what} {value!r}: use 1 to 64 characters among letters, digits, '_' and '-'"
        )
    return value


def shared_topology(*, queue_type: QueueType = "classic") -> Topology:
    """The five exchanges every task shares, plus the dead-letter queue.

    On a cluster (`quorum`) the dead-letter queue is replicated like the updates queue, so
    a dead letter with its reason survives the loss of one node.
    """
    dead = QueueSpec(
        name=DEAD_QUEUE,
        durable=True,
        arguments={
            **_type_argument(queue_type),
            "x-message-ttl": DEAD_MESSAGE_TTL_MS,
            "x-max-length": DEAD_QUEUE_MAX_LENGTH,
            "x-max-length-bytes": DEAD_QUEUE_MAX_BYTES,
            "x-overflow": "drop-head",
        },
        bindings=(BindingSpec(DEAD_LETTER_EXCHANGE, ""),),
    )
    return Topology(
        exchanges=(
            ExchangeSpec(UPDATES_EXCHANGE, "topic"),
            ExchangeSpec(MODELS_EXCHANGE, "topic"),
            ExchangeSpec(CONTROL_EXCHANGE, "direct"),
            ExchangeSpec(EVENTS_EXCHANGE, "topic"),
            ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout"),
        ),
        queues=(dead,),
    )


def updates_queue(task_id: str) -> str:
    """Name of the queue the aggregator of `task_id` consumes updates from."""
    return f"fedmq.{validate_id(task_id, what='task id')}.updates"


def control_queue(task_id: str) -> str:
    """Name of the queue the aggregator of `task_id` answers join requests from."""
    return f"fedmq.{validate_id(task_id, what='task id')}.control"


def follower_queue_name(task_id: str, follower_id: str) -> str:
    """Name of the queue holding the newest model of `task_id` for one follower."""
    task = validate_id(task_id, what="task id")
    return f"fedmq.{task}.follow.{validate_id(follower_id, what='follower id')}"


def task_topology(
    task_id: str,
    *,
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
    queue_type: QueueType = "classic",
) -> Topology:
    """The shared topology plus the updates and control queues of one task.

    `queue_type="quorum"` is meant for production (replicated); `classic` runs on any broker.
    """
    if max_update_bytes <= 0:
        raise ValueError(f"max_update_bytes must be positive, got {max_update_bytes}")
    if queue_type not in ("classic", "quorum"):
        raise ValueError(f"queue_type must be 'classic' or 'quorum', got {queue_type!r}")
    updates = QueueSpec(
        name=updates_queue(task_id),
        durable=True,
        arguments={
            "x-queue-type": queue_type,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-max-length-bytes": max_update_bytes,
            "x-overflow": "reject-publish",
        },
        bindings=(BindingSpec(UPDATES_EXCHANGE, f"update.{task_id}.*"),),
    )
    control = QueueSpec(
        name=control_queue(task_id),
        durable=True,
        arguments={"x-queue-type": queue_type, "x-message-ttl": CONTROL_MESSAGE_TTL_MS},
        bindings=(BindingSpec(CONTROL_EXCHANGE, join_key(task_id)),),
    )
    return shared_topology(queue_type=queue_type).merge(Topology(queues=(updates, control)))


def follower_queue(
    task_id: str, follower_id: str, *, queue_type: QueueType = "classic"
) -> QueueSpec:
    """A queue that always holds just the newest model of `task_id` (max-length 1, drop-head).

    Durable so a restarted trainer finds the newest model; `x-expires` deletes it once
    its follower has been gone for `FOLLOWER_QUEUE_EXPIRES_MS`. `quorum` on a cluster: a
    classic queue lives on one node and is unreachable while that node is down
    (docs/decisions/0023-quorum-follower-queues.md).
    """
    return QueueSpec(
        name=follower_queue_name(task_id, follower_id),
        durable=True,
        arguments={
            **_type_argument(queue_type),
            "x-max-length": 1,
            "x-overflow": "drop-head",
            "x-expires": FOLLOWER_QUEUE_EXPIRES_MS,
        },
        bindings=(BindingSpec(MODELS_EXCHANGE, model_key(task_id)),),
    )


def own_follower_topology(
    task_id: str, follower_id: str, *, queue_type: QueueType = "classic"
) -> Topology:
    """Only the follower queue: what a least-privilege trainer or evaluator may declare.

    Exchanges belong to the operator (definitions.json) or the aggregator; a trainer's
    broker user has no `configure` permission on them.
    """
    return Topology(queues=(follower_queue(task_id, follower_id, queue_type=queue_type),))


def follower_topology(task_id: str, follower_id: str) -> Topology:
    """The shared topology plus one follower queue, what a trainer or evaluator declares."""
    return shared_topology().merge(Topology(queues=(follower_queue(task_id, follower_id),)))


def events_queue(
    watcher_id: str, task_id: str | None = None, *, events: Sequence[EventType] | None = None
) -> QueueSpec:
    """A bounded, self-deleting queue receiving the events of one task (or of every task).

    `events` narrows a task's queue to those kinds (the aggregator needs only heartbeats and
    departures, not the stream of its own `model.published`); None means every kind.
    """
    watcher = validate_id(watcher_id, what="watcher id")
    if task_id is None:
        if events is not None:
            raise ValueError("`events` narrows the watch queue of one task: give `task_id` too")
        name = f"fedmq.watch.{watcher}"
        patterns: tuple[str, ...] = ("#",)
    else:
        task = validate_id(task_id, what="task id")
        name = f"fedmq.{task}.watch.{watcher}"
        unknown = set(events or ()) - _EVENT_TYPES
        if unknown:
            raise ValueError(f"unknown events {sorted(unknown)}; expected {sorted(_EVENT_TYPES)}")
        # One exact pattern per kind: `*.*.<task>` would also catch `heartbeat.<other>.<task>`.
        patterns = tuple(
            f"{event}.{task}.*" if event in _SENDER_KEYED else f"{event}.{task}"
            for event in _EVENT_ORDER
            if events is None or event in events
        )
    return QueueSpec(
        name=name,
        durable=False,
        arguments={
            "x-expires": WATCH_QUEUE_EXPIRES_MS,
            "x-max-length": WATCH_QUEUE_MAX_LENGTH,
            "x-overflow": "drop-head",
        },
        bindings=tuple(BindingSpec(EVENTS_EXCHANGE, p) for p in patterns),
    )


def _type_argument(queue_type: QueueType) -> dict[str, object]:
    """`x-queue-type` for a quorum queue; none for classic (as the queues were always declared,
    so an existing classic queue stays equivalent)."""
    if queue_type not in ("classic", "quorum"):
        raise ValueError(f"queue_type must be 'classic' or 'quorum', got {queue_type!r}")
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else {}


def update_key(task_id: str, trainer_id: str) -> str:
    """Routing key of an update: `update.<task>.<trainer>`."""
    task = validate_id(task_id, what="task id")
    return f"update.{task}.{validate_id(trainer_id, what='trainer id')}"


def model_key(task_id: str) -> str:
    """Routing key of a published global model: `model.<task>`."""
    return f"model.{validate_id(task_id, what='task id')}"


def join_key(task_id: str) -> str:
    """Routing key of a join request: `join.<task>`."""
    return f"join.{validate_id(task_id, what='task id')}"


def event_key(event: EventType, task_id: str, who: str | None = None) -> str:
    """Routing key of an event on `fedmq.events`.

    `heartbeat` and `trainer.left` need `who` (`heartbeat.<task>.<who>`,
    `trainer.left.<task>.<who>`): with the sender in the key, the broker's topic
    permissions let a site's login publish only its own. Every other event is
    `<event>.<task>` and takes no `who`.
    """
    task = validate_id(task_id, what="task id")
    if event in _SENDER_KEYED:
        if who is None:
            raise ValueError(f"a {event!r} event key needs `who` (the sender's id)")
        return f"{event}.{task}.{validate_id(who, what='sender id')}"
    if event not in _EVENT_TYPES:
        raise ValueError(f"unknown event {event!r}; expected one of {sorted(_EVENT_TYPES)}")
    if who is not None:
        raise ValueError(f"a {event!r} event key takes no `who`")
    return f"{event}.{task}"


_EVENT_ORDER: Final[tuple[EventType, ...]] = (
    "heartbeat",
    "trainer.joined",
    "trainer.left",
    "model.published",
    "eval",
    "update.rejected",
)
_EVENT_TYPES: Final = frozenset(_EVENT_ORDER)
_SENDER_KEYED: Final = frozenset({"heartbeat", "trainer.left"})
"""Events whose routing key ends with the sender's id."""
