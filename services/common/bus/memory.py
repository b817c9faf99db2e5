"""In-process `Bus` for unit tests of services: RabbitMQ's routing and queue rules, no broker.

Faithful to what fedmq relies on: topic/direct/fanout routing, `x-max-length(-bytes)` with
`drop-head` or `reject-publish`, queue dead-letter exchanges (`x-death`), manual acks with
prefetch, requeue on cancel, direct reply-to and `user_id` checks. Not modelled: TTLs,
`x-expires`, exclusivity, priorities, connection loss.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import Queue
from typing import Final

import structlog

from services.common.bus.base import (
    DEFAULT_PREFETCH,
    DEFAULT_PUBLISH_TIMEOUT_S,
    DEFAULT_RPC_TIMEOUT_S,
    DIRECT_REPLY_TO,
    Bus,
    Delivery,
    Handler,
    MessageProperties,
    check_headers,
    dead_letter_properties,
    new_message_id,
    run_handler,
)
from services.common.bus.errors import (
    AlreadySettled,
    ConnectionLost,
    NotFound,
    PreconditionFailed,
    PublishRefused,
    RpcTimeout,
    Unroutable,
)
from services.common.topology import DEAD_LETTER_EXCHANGE, ExchangeSpec, QueueSpec, Topology

log = structlog.get_logger(__name__)

DEFAULT_JOIN_TIMEOUT_S: Final = 5.0
"""How long `InMemoryBus.join` waits for handlers to go idle."""
_REPLY_PREFIX: Final = DIRECT_REPLY_TO + "."


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more words."""
    return _match_words(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match_words(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match_words(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return head in ("*", words[0]) and _match_words(rest, words[1:])


@dataclass(eq=False)
class _Message:
    body: bytes
    properties: MessageProperties
    exchange: str
    routing_key: str
    redelivered: bool = False


@dataclass(eq=False)
class _Owner:
    """Who holds unacknowledged messages: a consumer or `get`. Dead once cancelled/closed."""

    alive: bool = True
    unacked: dict[_MemHandle, None] = field(default_factory=dict)  # ordered set


@dataclass(eq=False)
class _MemHandle:
    queue: str
    message: _Message
    owner: _Owner | None  # None: an auto-acknowledged RPC reply
    settled: bool = False

    def is_settled(self) -> bool:
        return self.settled


@dataclass(eq=False)
class _Queue:
    spec: QueueSpec
    ready: deque[_Message] = field(default_factory=deque)
    bindings: set[tuple[str, str]] = field(default_factory=set)
    consumer_tags: list[str] = field(default_factory=list)
    next_consumer: int = 0

    @property
    def ready_bytes(self) -> int:
        return sum(len(m.body) for m in self.ready)


@dataclass(eq=False)
class _MemConsumer:
    tag: str
    queue: str
    handler: Handler
    prefetch: int
    owner: _Owner = field(default_factory=_Owner)
    work: Queue[Delivery | None] = field(default_factory=Queue)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class InMemoryBus(Bus):
    """A `Bus` living in this process; `user` is the login that `user_id` must match."""

    def __init__(self, *, user: str = "guest", topology: Topology | None = None) -> None:
        self._user = user
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._exchanges: dict[str, ExchangeSpec] = {}
        self._queues: dict[str, _Queue] = {}
        self._consumers: dict[str, _MemConsumer] = {}
        self._rpc_waiters: dict[str, Future[Delivery]] = {}
        self._getter = _Owner()
        self._in_flight = 0
        self._closed = False
        if topology is not None:
            self.declare(topology)

    # -- declarations --------------------------------------------------------------------

    def declare(self, topology: Topology) -> None:
        """Declare exchanges, queues and bindings; a changed definition is `PreconditionFailed`."""
        with self._lock:
            self._check_open()
            for exchange in topology.exchanges:
                self._declare_exchange(exchange)
            for spec in topology.queues:
                self._declare_queue(spec)

    def _declare_exchange(self, spec: ExchangeSpec) -> None:
        known = self._exchanges.setdefault(spec.name, spec)
        if known != spec:
            raise PreconditionFailed(f"exchange {spec.name!r} exists as {known!r}, not {spec!r}")

    def _declare_queue(self, spec: QueueSpec) -> None:
        queue = self._queues.setdefault(spec.name, _Queue(spec))
        if dataclasses.replace(queue.spec, bindings=()) != dataclasses.replace(spec, bindings=()):
            raise PreconditionFailed(f"queue {spec.name!r} exists with different settings")
        for binding in spec.bindings:
            if binding.exchange not in self._exchanges:
                raise NotFound(f"cannot bind {spec.name!r}: no exchange {binding.exchange!r}")
            queue.bindings.add((binding.exchange, binding.routing_key))

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        kind: str,
        message_id: str | None = None,
        headers: Mapping[str, object] | None = None,
        user_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        mandatory: bool = False,
        persistent: bool = True,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT_S,
    ) -> str:
        """Route and enqueue at once; the same errors as the broker's confirms would give."""
        message_id = message_id or new_message_id()
        properties = MessageProperties(
            kind=kind,
            message_id=message_id,
            user_id=user_id,
            headers=check_headers(headers),
            reply_to=reply_to,
            correlation_id=correlation_id,
            timestamp=int(time.time()),
            persistent=persistent,
        )
        if user_id is not None and user_id != self._user:
            raise PreconditionFailed(
                f"user_id property set to {user_id!r} but authenticated user was {self._user!r}"
            )
        self._publish_properties(exchange, routing_key, bytes(body), properties, mandatory)
        return message_id

    def _publish_properties(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties,
        mandatory: bool,
    ) -> None:
        with self._lock:
            self._check_open()
            if exchange == "" and routing_key.startswith(_REPLY_PREFIX):
                self._deliver_reply(routing_key, _Message(body, properties, exchange, routing_key))
                return
            targets = self._route(exchange, routing_key)
            if not targets and mandatory:
                raise Unroutable(f"no queue is bound to {exchange!r} for {routing_key!r}")
            refused = [
                name
                for name in targets
                if not self._enqueue(
                    self._queues[name], _Message(body, properties, exchange, routing_key)
                )
            ]
            for name in targets:
                self._dispatch(self._queues[name])
        if refused:
            raise PublishRefused(f"queue(s) {refused} are full and refuse new messages")

    def _route(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":
            return [routing_key] if routing_key in self._queues else []
        spec = self._exchanges.get(exchange)
        if spec is None:
            raise NotFound(f"no exchange {exchange!r}")
        return [
            name
            for name, queue in self._queues.items()
            if any(
                bound == exchange and _binding_matches(spec, pattern, routing_key)
                for bound, pattern in queue.bindings
            )
        ]

    def _enqueue(self, queue: _Queue, message: _Message) -> bool:
        """Append `message` honouring the queue's limits; False if `reject-publish` refuses it."""
        arguments = queue.spec.arguments
        max_length = _int_argument(arguments, "x-max-length")
        max_bytes = _int_argument(arguments, "x-max-length-bytes")
        if arguments.get("x-overflow") == "reject-publish":
            too_long = max_length is not None and len(queue.ready) + 1 > max_length
            too_big = max_bytes is not None and queue.ready_bytes + len(message.body) > max_bytes
            if too_long or too_big:
                return False
            queue.ready.append(message)
            return True
        queue.ready.append(message)
        while (max_length is not None and len(queue.ready) > max_length) or (
            max_bytes is not None and queue.ready_bytes > max_bytes
        ):
            self._broker_dead_letter(queue, queue.ready.popleft(), "maxlen")
        return True

    def _broker_dead_letter(self, queue: _Queue, message: _Message, reason: str) -> None:
        """What the broker does with a rejected or dropped message: its queue's DLX, if any."""
        dlx = queue.spec.arguments.get("x-dead-letter-exchange")
        if not isinstance(dlx, str) or dlx not in self._exchanges:
            return
        arguments = queue.spec.arguments
        routing_key = str(arguments.get("x-dead-letter-routing-key", message.routing_key))
        death = {
            "queue": queue.spec.name,
            "reason": reason,
            "exchange": message.exchange,
            "routing-keys": [message.routing_key],
            "count": 1,
        }
        headers = dict(message.properties.headers)
        headers["x-death"] = [death, *_as_list(headers.get("x-death"))]
        properties = dataclasses.replace(message.properties, headers=headers)
        for name in self._route(dlx, routing_key):
            target = self._queues[name]
            self._enqueue(target, _Message(message.body, properties, dlx, routing_key))
            self._dispatch(target)

    def _deliver_reply(self, address: str, message: _Message) -> None:
        waiter = self._rpc_waiters.get(address)
        if waiter is None or waiter.done():
            log.debug("dropping a late or unknown reply", address=address)
            return
        waiter.set_result(_delivery(message, _MemHandle("", message, None)))

    # -- consuming -------------------------------------------------------------------------

    def consume(self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH) -> str:
        """Deliver `queue`'s messages to `handler` on a worker thread, in order."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        consumer = _MemConsumer(f"memory-{uuid.uuid4().hex[:12]}", queue, handler, prefetch)
        consumer.thread = threading.Thread(
            target=self._work, args=(consumer,), name=f"fedmq-consumer-{queue}", daemon=True
        )
        with self._lock:
            self._check_open()
            target = self._queue(queue)
            consumer.thread.start()
            self._consumers[consumer.tag] = consumer
            target.consumer_tags.append(consumer.tag)
            self._dispatch(target)
        return consumer.tag

    def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer after its running handler; what it still held goes back, redelivered."""
        with self._lock:
            consumer = self._consumers.pop(consumer_tag, None)
            if consumer is None:
                raise ValueError(f"unknown consumer {consumer_tag!r}")
            queue = self._queues.get(consumer.queue)
            if queue is not None and consumer_tag in queue.consumer_tags:
                queue.consumer_tags.remove(consumer_tag)
        consumer.stopping.set()
        consumer.work.put(None)
        if consumer.thread is not None and consumer.thread is not threading.current_thread():
            consumer.thread.join()
        with self._lock:
            self._release(consumer.owner)

    def _release(self, owner: _Owner) -> None:
        """Requeue at the head, in order, what a dead owner held unsettled."""
        owner.alive = False
        held = [h for h in owner.unacked if not h.settled]
        owner.unacked.clear()
        for handle in reversed(held):
            queue = self._queues.get(handle.queue)
            if queue is not None:
                handle.message.redelivered = True
                queue.ready.appendleft(handle.message)
        for name in {h.queue for h in held}:
            if name in self._queues:
                self._dispatch(self._queues[name])

    def _dispatch(self, queue: _Queue) -> None:
        while queue.ready:
            consumer = self._next_consumer(queue)
            if consumer is None:
                return
            message = queue.ready.popleft()
            handle = _MemHandle(queue.spec.name, message, consumer.owner)
            consumer.owner.unacked[handle] = None
            self._in_flight += 1
            consumer.work.put(_delivery(message, handle))

    def _next_consumer(self, queue: _Queue) -> _MemConsumer | None:
        tags = queue.consumer_tags
        for offset in range(len(tags)):
            index = (queue.next_consumer + offset) % len(tags)
            consumer = self._consumers[tags[index]]
            if len(consumer.owner.unacked) < consumer.prefetch:
                queue.next_consumer = index + 1
                return consumer
        return None

    def _work(self, consumer: _MemConsumer) -> None:
        while True:
            delivery = consumer.work.get()
            if delivery is None:
                return
            handle = _handle_of(delivery)
            try:
                if not consumer.stopping.is_set():
                    run_handler(self, consumer.handler, delivery, settled=handle.is_settled)
            finally:
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()

    def join(self, timeout: float = DEFAULT_JOIN_TIMEOUT_S) -> None:
        """Wait until every dispatched delivery has been handled (a test helper)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout):
                raise TimeoutError(f"{self._in_flight} deliveries still being handled")

    # -- settling --------------------------------------------------------------------------

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge: the message is gone."""
        self._settle(delivery, "ack", None)

    def reject(self, delivery: Delivery) -> None:
        """Reject without requeue: to the queue's dead-letter exchange, if it has one."""

        def to_queue_dlx(handle: _MemHandle) -> None:
            queue = self._queues.get(handle.queue)
            if queue is not None:
                self._broker_dead_letter(queue, handle.message, "rejected")

        self._settle(delivery, "reject", to_queue_dlx)

    def dead_letter(self, delivery: Delivery, *, reason: str, detail: str = "") -> None:
        """Copy to `fedmq.dlx` with the reason headers, then ack."""
        properties = dead_letter_properties(delivery, reason=reason, detail=detail)

        def copy_to_dlx(_handle: _MemHandle) -> None:
            self._publish_properties(
                DEAD_LETTER_EXCHANGE, delivery.routing_key, delivery.body, properties, False
            )

        self._settle(delivery, "dead-letter", copy_to_dlx)

    def _settle(
        self, delivery: Delivery, action: str, act: Callable[[_MemHandle], None] | None
    ) -> None:
        handle = _handle_of(delivery)
        if handle.owner is None:
            return  # an RPC reply: auto-acknowledged
        with self._lock:
            if handle.settled:
                raise AlreadySettled(f"message {delivery.message_id!r} was already settled")
            if not handle.owner.alive:
                handle.settled = True
                log.warning(f"{action} dropped: its consumer is gone; the message was requeued")
                return
            if act is not None:
                act(handle)  # may raise (e.g. no dead-letter exchange): stays unsettled
            handle.settled = True
            handle.owner.unacked.pop(handle, None)
            queue = self._queues.get(handle.queue)
            if queue is not None:
                self._dispatch(queue)

    # -- RPC and queue operations ----------------------------------------------------------

    def call(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        kind: str,
        headers: Mapping[str, object] | None = None,
        user_id: str | None = None,
        timeout: float = DEFAULT_RPC_TIMEOUT_S,
    ) -> Delivery:
        """Request/reply through a private reply-to address, like direct reply-to."""
        address = _REPLY_PREFIX + uuid.uuid4().hex
        reply: Future[Delivery] = Future()
        with self._lock:
            self._rpc_waiters[address] = reply
        try:
            self.publish(
                exchange,
                routing_key,
                body,
                kind=kind,
                headers=headers,
                user_id=user_id,
                reply_to=address,
                correlation_id=new_message_id(),
                mandatory=True,
                persistent=False,
            )
            return reply.result(timeout=timeout)
        except TimeoutError:
            raise RpcTimeout(
                f"no reply to {kind} sent to {exchange!r}/{routing_key!r} within {timeout:.1f}s"
            ) from None
        finally:
            with self._lock:
                self._rpc_waiters.pop(address, None)

    def get(self, queue: str) -> Delivery | None:
        """Take the next ready message of `queue` (manual ack), or None."""
        with self._lock:
            self._check_open()
            target = self._queue(queue)
            if not target.ready:
                return None
            message = target.ready.popleft()
            handle = _MemHandle(queue, message, self._getter)
            self._getter.unacked[handle] = None
            return _delivery(message, handle)

    def purge(self, queue: str) -> int:
        """Drop the ready messages of `queue`; return how many."""
        with self._lock:
            target = self._queue(queue)
            count = len(target.ready)
            target.ready.clear()
            return count

    def delete_queue(self, queue: str) -> int:
        """Delete `queue` and its bindings; return how many ready messages it held."""
        with self._lock:
            target = self._queues.pop(queue, None)
            return 0 if target is None else len(target.ready)

    def queue_depth(self, queue: str) -> int:
        """Ready messages in `queue`."""
        with self._lock:
            return len(self._queue(queue).ready)

    def close(self) -> None:
        """Stop every consumer after its running handler; later calls raise `ConnectionLost`."""
        with self._lock:
            if self._closed:
                return
            tags = list(self._consumers)
        for tag in tags:
            self.cancel(tag)
        with self._lock:
            self._release(self._getter)
            self._closed = True

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise NotFound(f"no queue {name!r}")
        return queue

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost("the bus is closed")


def _binding_matches(exchange: ExchangeSpec, pattern: str, routing_key: str) -> bool:
    if exchange.type == "fanout":
        return True
    if exchange.type == "topic":
        return topic_matches(pattern, routing_key)
    if exchange.type == "direct":
        return pattern == routing_key
    raise NotImplementedError(f"InMemoryBus does not route {exchange.type!r} exchanges")


def _int_argument(arguments: Mapping[str, object], name: str) -> int | None:
    value = arguments.get(name)
    return value if isinstance(value, int) else None


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def _handle_of(delivery: Delivery) -> _MemHandle:
    if not isinstance(delivery.handle, _MemHandle):
        raise TypeError("this delivery did not come from an InMemoryBus")
    return delivery.handle


def _delivery(message: _Message, handle: _MemHandle) -> Delivery:
    return Delivery(
        body=message.body,
        properties=message.properties,
        exchange=message.exchange,
        routing_key=message.routing_key,
        redelivered=message.redelivered,
        handle=handle,
    )
