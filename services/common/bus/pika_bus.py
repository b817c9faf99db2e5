"""RabbitMQ `Bus`: one I/O thread owns a pika BlockingConnection; other threads hand it work.

pika's BlockingConnection is not thread-safe: the only call another thread makes on it is
`add_callback_threadsafe`, which wakes the I/O thread to run the operations queued for it
(pika's threaded-consumer example). Handlers run on one worker thread per consumer, so long
work never starves heartbeats. After a lost connection the I/O thread reconnects with a
bounded, jittered, capped exponential backoff, re-declares the topology and re-registers
consumers (pika's ReconnectingExampleConsumer). Given the nodes of a cluster, it connects to
the first that answers and, after a loss, tries the next node first. Opening a connection
(URL, TLS, readable errors, backoff) lives in `pika_connect`, translating pika's objects in
`pika_wire`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any, Final, TypeVar

import pika
import pika.exceptions
import structlog

from services.common.bus.base import (
    DEFAULT_PREFETCH,
    DEFAULT_PUBLISH_TIMEOUT_S,
    DEFAULT_RPC_TIMEOUT_S,
    DEFAULT_SETTLE_TIMEOUT_S,
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
    AccessRefused,
    AlreadySettled,
    ConnectionLost,
    PublishRefused,
    RpcTimeout,
    TlsError,
    TransportError,
    Unroutable,
)
from services.common.bus.pika_connect import (
    DEFAULT_HEARTBEAT_S,
    ReconnectPolicy,
    connection_parameters,
    open_connection,
    redact_url,
    tune_socket_reads,
)
from services.common.bus.pika_wire import channel_error, from_pika_properties, to_pika_properties
from services.common.topology import DEAD_LETTER_EXCHANGE, Topology

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S: Final = 30.0
"""How long the constructor waits for the first connection (retrying with the policy)."""
DEFAULT_ADMIN_TIMEOUT_S: Final = 30.0
"""How long declare/consume/get/purge/delete/queue_depth wait, including a reconnect."""
IO_POLL_INTERVAL_S: Final = 0.2
"""Longest the I/O thread blocks in pika between looks at its own work (a wake-up is sooner)."""
RUNNING_OP_GRACE_S: Final = 30.0
"""Extra wait for an operation already running on the I/O thread when its timeout ran out."""
CLOSE_GRACE_S: Final = 10.0
"""How long `close`/`cancel` wait for a running handler before giving up on it."""
CONSUMER_RETRY_INTERVAL_S: Final = 5.0
"""Pause before re-subscribing a consumer whose channel or queue went away."""

_CONNECTION_ERRORS: Final = (pika.exceptions.AMQPConnectionError,)


class _Lease:
    """Validity of the deliveries received on one channel; dead once it or its connection closed."""

    __slots__ = ("alive",)

    def __init__(self) -> None:
        self.alive = True


@dataclass(eq=False)
class _PikaHandle:
    """What `ack` needs: the channel a delivery came on and its tag. None channel: auto-acked."""

    channel: Any
    lease: _Lease
    delivery_tag: int
    settled: bool = False

    def is_settled(self) -> bool:
        return self.settled


@dataclass(eq=False)
class _Consumer:
    tag: str
    queue: str
    handler: Handler
    prefetch: int
    work: Queue[Delivery | None] = field(default_factory=Queue)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    # Owned by the I/O thread:
    channel: Any = None
    lease: _Lease = field(default_factory=_Lease)
    broker_cancelled: bool = False
    retry_at: float = 0.0


@dataclass(frozen=True)
class _Node:
    """One broker node the bus may connect to: its pika parameters and its redacted URL."""

    params: Any
    where: str


@dataclass(eq=False)
class _Op:
    fn: Callable[[], Any]
    future: Future[Any]


class PikaBus(Bus):
    """`Bus` over RabbitMQ with publisher confirms, manual acks and automatic reconnection."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        allow_insecure_remote: bool = False,
        heartbeat: int = DEFAULT_HEARTBEAT_S,
        topology: Topology | None = None,
        reconnect: ReconnectPolicy | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        connection_name: str | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("a bus needs at least one broker URL")
        self._nodes = [
            _Node(
                connection_parameters(
                    node_url,
                    ca_file=ca_file,
                    cert_file=cert_file,
                    key_file=key_file,
                    allow_insecure_remote=allow_insecure_remote,
                    heartbeat=heartbeat,
                    connection_name=connection_name,
                ),
                redact_url(node_url),
            )
            for node_url in urls
        ]
        self._node_index = 0
        """The node tried first at the next connection: the one in use, or the next after it."""
        self._where = ", ".join(node.where for node in self._nodes)
        tune_socket_reads()
        self._policy = reconnect or ReconnectPolicy()
        self._lock = threading.Lock()
        self._ops: Queue[_Op] = Queue()
        self._consumers: dict[str, _Consumer] = {}
        self._rpc_waiters: dict[str, Future[Delivery]] = {}
        self._stopping = threading.Event()
        self._closed = False
        self._failure: TransportError | None = None
        self._connects = 0
        self._last_connect_error = ""
        self._first_connect: Future[None] = Future()
        # Owned by the I/O thread (written there only):
        self._conn: Any = None
        self._pub: Any = None
        self._admin: Any = None
        self._rpc: Any = None
        self._getter: Any = None
        self._get_lease = _Lease()
        self._topology = Topology()
        self._io = threading.Thread(target=self._io_main, name="fedmq-bus-io", daemon=True)
        self._io.start()
        self._await_first_connect(connect_timeout)
        if topology is not None:
            try:
                self.declare(topology)
            except BaseException:
                self.close()
                raise

    # -- state -------------------------------------------------------------------------

    @property
    def connects(self) -> int:
        """How many times a connection was established (1 + successful reconnects)."""
        return self._connects

    @property
    def is_connected(self) -> bool:
        """Whether a connection is open right now."""
        return self._conn is not None

    @property
    def io_thread(self) -> threading.Thread:
        """The thread that owns the connection (handlers never run on it)."""
        return self._io

    # -- public API ------------------------------------------------------------------------

    def declare(self, topology: Topology) -> None:
        """Declare `topology`; it is declared again after every reconnect."""
        declare = functools.partial(self._declare_now, topology, remember=True)
        self._admin_op(declare, what="declare")

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
        """Publish with confirms; retried on a new connection while `timeout` allows.

        A retry after a connection lost mid-confirm may deliver twice: consumers
        de-duplicate by message id (at-least-once).
        """
        message_id = message_id or new_message_id()
        properties = to_pika_properties(
            MessageProperties(
                kind=kind,
                message_id=message_id,
                user_id=user_id,
                headers=check_headers(headers),
                reply_to=reply_to,
                correlation_id=correlation_id,
                timestamp=int(time.time()),
                persistent=persistent,
            )
        )
        publish = functools.partial(
            self._publish_now, exchange, routing_key, body, properties, mandatory
        )
        self._retry_until(time.monotonic() + timeout, publish, what=f"publish to {exchange!r}")
        return message_id

    def consume(self, queue: str, handler: Handler, *, prefetch: int = DEFAULT_PREFETCH) -> str:
        """Consume `queue`; `handler` runs on this consumer's worker thread, one at a time."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        consumer = _Consumer(f"fedmq-{uuid.uuid4().hex[:12]}", queue, handler, prefetch)
        consumer.thread = threading.Thread(
            target=self._work, args=(consumer,), name=f"fedmq-consumer-{queue}", daemon=True
        )
        consumer.thread.start()
        try:
            register = functools.partial(self._register_consumer, consumer)
            self._admin_op(register, what=f"consume {queue!r}")
        except BaseException:
            consumer.stopping.set()
            consumer.work.put(None)
            raise
        return consumer.tag

    def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer: no new deliveries, wait for its handler, requeue what it held."""
        with self._lock:
            consumer = self._consumers.pop(consumer_tag, None)
        if consumer is None:
            raise ValueError(f"unknown consumer {consumer_tag!r}")
        self._stop_consumer(consumer)

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge; dropped with a log line if its connection is gone (it comes back)."""
        self._settle(delivery, "ack", _basic_ack)

    def ack_all(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge several deliveries with one round trip to the I/O thread."""
        self._settle_all(deliveries, "ack", _basic_ack)

    def reject(self, delivery: Delivery) -> None:
        """Reject without requeue; the queue's dead-letter exchange, if any, receives it."""
        self._settle(delivery, "reject", _basic_reject)

    def dead_letter(self, delivery: Delivery, *, reason: str, detail: str = "") -> None:
        """Publish a copy to `fedmq.dlx` with the reason (confirmed), then ack the original."""
        properties = to_pika_properties(
            dead_letter_properties(delivery, reason=reason, detail=detail)
        )

        def publish_then_ack(handle: _PikaHandle) -> None:
            self._publish_on(
                self._pub_channel(),
                DEAD_LETTER_EXCHANGE,
                delivery.routing_key,
                delivery.body,
                properties,
                mandatory=False,
            )
            handle.channel.basic_ack(handle.delivery_tag)

        self._settle(delivery, "dead-letter", publish_then_ack)

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
        """Request/reply over direct reply-to; `Unroutable` if no queue takes the request."""
        correlation_id = new_message_id()
        properties = to_pika_properties(
            MessageProperties(
                kind=kind,
                message_id=new_message_id(),
                user_id=user_id,
                headers=check_headers(headers),
                reply_to=DIRECT_REPLY_TO,
                correlation_id=correlation_id,
                timestamp=int(time.time()),
                persistent=False,
            )
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._call_once(exchange, routing_key, body, properties, deadline)
            except TimeoutError:
                raise RpcTimeout(
                    f"no reply to {kind} sent to {exchange!r}/{routing_key!r} within {timeout:.1f}s"
                ) from None
            except ConnectionLost:
                if not self._may_retry(deadline):
                    raise
                log.info("retrying a request after a lost connection", kind=kind)

    def get(self, queue: str) -> Delivery | None:
        """Take the next message of `queue` (manual ack) or None when it is empty."""
        return self._admin_op(functools.partial(self._get_now, queue), what=f"get from {queue!r}")

    def purge(self, queue: str) -> int:
        """Drop the ready messages of `queue`; return how many."""
        purge = functools.partial(self._admin_call, "purge", queue)
        return self._admin_op(purge, what=f"purge {queue!r}")

    def delete_queue(self, queue: str) -> int:
        """Delete `queue` (no error if absent); return how many messages it held."""
        delete = functools.partial(self._admin_call, "delete", queue)
        return self._admin_op(delete, what=f"delete {queue!r}")

    def queue_depth(self, queue: str) -> int:
        """Ready messages in `queue` (passive declare); `NotFound` if it does not exist."""
        depth = functools.partial(self._admin_call, "depth", queue)
        return self._admin_op(depth, what=f"depth of {queue!r}")

    def close(self) -> None:
        """Cancel consumers, let running handlers finish, close the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            consumers = list(self._consumers.values())
            self._consumers.clear()
        for consumer in consumers:
            self._stop_consumer(consumer)
        self._stopping.set()
        self._wake()
        if threading.current_thread() is not self._io:
            self._io.join(CLOSE_GRACE_S)

    # -- submitting work to the I/O thread ----------------------------------------------

    def _submit(
        self, fn: Callable[[], T], *, timeout: float, what: str, internal: bool = False
    ) -> T:
        if threading.current_thread() is self._io:
            return fn()
        if not internal:
            self._check_usable()
        elif not self._io.is_alive():
            raise ConnectionLost(f"{what}: the bus is closed")
        future: Future[T] = Future()
        self._ops.put(_Op(fn, future))
        self._wake()
        return _wait(future, timeout, what)

    def _retry_until(self, deadline: float, fn: Callable[[], T], *, what: str) -> T:
        while True:
            try:
                return self._submit(fn, timeout=deadline - time.monotonic(), what=what)
            except ConnectionLost:
                if not self._may_retry(deadline):
                    raise
                log.info("retrying after a lost connection", what=what)

    def _admin_op(self, fn: Callable[[], T], *, what: str) -> T:
        return self._retry_until(time.monotonic() + DEFAULT_ADMIN_TIMEOUT_S, fn, what=what)

    def _may_retry(self, deadline: float) -> bool:
        return time.monotonic() < deadline and not self._closed and self._failure is None

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise ConnectionLost(str(self._failure)) from self._failure
        if self._closed:
            raise ConnectionLost("the bus is closed")

    def _wake(self) -> None:
        connection = self._conn
        if connection is None:
            return  # not connected: the I/O loop runs queued work once it is
        with contextlib.suppress(*_CONNECTION_ERRORS):  # closing: queued work runs after reconnect
            connection.add_callback_threadsafe(_noop)

    # -- the I/O thread ------------------------------------------------------------------

    def _await_first_connect(self, timeout: float) -> None:
        try:
            self._first_connect.result(timeout)
        except TimeoutError:
            self.close()
            error = self._last_connect_error.rpartition(f"{self._where}: ")[2]
            last = f" (last error: {error})" if error else ""
            raise ConnectionLost(
                f"no broker answered at {self._where} within {timeout:.0f}s{last}"
            ) from None
        except TransportError:
            self.close()
            raise

    def _io_main(self) -> None:
        attempt = 0
        while not self._stopping.is_set() and self._failure is None:
            if self._connect_once():
                attempt = 0
                self._serve_until_lost()
            if self._stopping.is_set() or self._failure is not None:
                break
            if attempt >= self._policy.max_attempts:
                self._give_up(attempt)
                break
            delay = self._policy.delay(attempt)
            attempt += 1
            log.info("reconnecting", broker=self._where, attempt=attempt, in_s=round(delay, 2))
            self._stopping.wait(delay)
        self._drain_ops(self._failure or ConnectionLost("the bus is closed"))
        if not self._first_connect.done():
            self._first_connect.set_exception(ConnectionLost("the bus was closed while connecting"))

    def _connect_once(self) -> bool:
        try:
            self._open()
        except (AccessRefused, TlsError) as exc:
            if not self._first_connect.done():
                self._failure = exc  # a wrong password or certificate will not heal by itself
                self._first_connect.set_exception(exc)
            else:
                log.error("broker refused the reconnection", broker=self._where, error=str(exc))
            return False
        except ConnectionLost as exc:
            self._last_connect_error = str(exc)
            log.warning("broker unreachable", broker=self._where, error=str(exc))
            return False
        except Exception:
            log.exception("unexpected error while connecting", broker=self._where)
            self._drop_connection(graceful=False)
            return False
        self._connects += 1
        node = self._nodes[self._node_index].where
        log.info("connected", broker=node, connects=self._connects)
        if not self._first_connect.done():
            self._first_connect.set_result(None)
        return True

    def _open(self) -> None:
        self._conn = self._open_any_node()
        try:
            self._pub = self._open_confirm_channel()
            self._redeclare()
            self._resume_consumers()
        except _CONNECTION_ERRORS as exc:
            self._drop_connection(graceful=False)
            raise ConnectionLost(f"connection lost while setting up: {exc!r}") from exc

    def _open_any_node(self) -> Any:
        """Connect to the first node that answers, starting from `_node_index`.

        A refused login or certificate is raised at once (every node shares them); a node
        that does not answer passes the turn to the next one.
        """
        lost: ConnectionLost | None = None
        count = len(self._nodes)
        for offset in range(count):
            index = (self._node_index + offset) % count
            node = self._nodes[index]
            try:
                connection = open_connection(node.params, node.where)
            except ConnectionLost as exc:
                lost = exc
                if count > 1:
                    log.info("broker node unreachable; trying the next", node=node.where)
                continue
            self._node_index = index
            return connection
        assert lost is not None
        raise lost

    def _serve_until_lost(self) -> None:
        try:
            while not self._stopping.is_set():
                self._conn.process_data_events(time_limit=IO_POLL_INTERVAL_S)
                self._run_queued_ops()
                self._heal_consumers()
            self._run_queued_ops()  # let work submitted during close (acks) finish
        except _CONNECTION_ERRORS as exc:
            node = self._nodes[self._node_index].where
            log.warning("connection lost", broker=node, error=repr(exc))
            # Its node may be gone: the next attempt starts with another one.
            self._node_index = (self._node_index + 1) % len(self._nodes)
        except Exception:
            # A bug here must not kill the I/O thread silently: reconnect from scratch.
            log.exception("unexpected error on the bus I/O thread; reconnecting")
        finally:
            self._drop_connection(graceful=self._stopping.is_set())

    def _run_queued_ops(self) -> None:
        while True:
            try:
                op = self._ops.get_nowait()
            except Empty:
                return
            self._run_op(op)

    def _run_op(self, op: _Op) -> None:
        if not op.future.set_running_or_notify_cancel():
            return  # its caller gave up waiting
        try:
            result = op.fn()
        except _CONNECTION_ERRORS as exc:
            op.future.set_exception(_lost(exc))
            raise
        except pika.exceptions.ChannelClosedByBroker as exc:
            op.future.set_exception(_chain(channel_error(exc, "operation"), exc))
        except Exception as exc:
            op.future.set_exception(exc)
        else:
            op.future.set_result(result)

    def _drain_ops(self, error: TransportError) -> None:
        while True:
            try:
                op = self._ops.get_nowait()
            except Empty:
                return
            if op.future.set_running_or_notify_cancel():
                op.future.set_exception(error)

    def _give_up(self, attempts: int) -> None:
        self._failure = ConnectionLost(
            f"gave up reconnecting to the broker at {self._where} after {attempts} attempts"
        )
        log.error("giving up on the broker", broker=self._where, attempts=attempts)
        if not self._first_connect.done():
            self._first_connect.set_exception(self._failure)
        with self._lock:
            consumers = list(self._consumers.values())
        for consumer in consumers:
            consumer.stopping.set()
            consumer.work.put(None)

    def _drop_connection(self, *, graceful: bool) -> None:
        with self._lock:
            consumers = list(self._consumers.values())
        for consumer in consumers:
            consumer.lease.alive = False
            consumer.channel = None
        self._get_lease.alive = False
        self._fail_rpc_waiters(ConnectionLost("the connection closed before the reply came"))
        connection, self._conn = self._conn, None
        self._pub = self._admin = self._rpc = self._getter = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except _CONNECTION_ERRORS as exc:
                log.debug("error while closing the connection", error=repr(exc), graceful=graceful)

    # -- channels -------------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            raise ConnectionLost("not connected")
        return self._conn

    def _open_confirm_channel(self) -> Any:
        channel = self._connection().channel()
        channel.confirm_delivery()
        return channel

    def _pub_channel(self) -> Any:
        if self._pub is None or not self._pub.is_open:
            self._pub = self._open_confirm_channel()
        return self._pub

    def _admin_channel(self) -> Any:
        if self._admin is None or not self._admin.is_open:
            self._admin = self._connection().channel()
        return self._admin

    def _rpc_channel(self) -> Any:
        if self._rpc is None or not self._rpc.is_open:
            channel = self._open_confirm_channel()
            # RabbitMQ's direct reply-to only works in no-ack mode; a lost reply is a
            # caller's RpcTimeout and its retry, never a lost update.
            channel.basic_consume(DIRECT_REPLY_TO, self._on_rpc_reply, auto_ack=True)
            self._rpc = channel
        return self._rpc

    def _get_channel(self) -> tuple[Any, _Lease]:
        if self._getter is None or not self._getter.is_open:
            self._get_lease.alive = False
            self._get_lease = _Lease()
            self._getter = self._connection().channel()
        return self._getter, self._get_lease

    # -- work run on the I/O thread -----------------------------------------------------

    def _declare_now(self, topology: Topology, *, remember: bool) -> None:
        merged = self._topology.merge(topology)  # a conflicting spec fails before any I/O
        channel = self._admin_channel()
        try:
            for exchange in topology.exchanges:
                channel.exchange_declare(
                    exchange.name, exchange_type=exchange.type, durable=exchange.durable
                )
            for spec in topology.queues:
                channel.queue_declare(
                    spec.name,
                    durable=spec.durable,
                    exclusive=spec.exclusive,
                    auto_delete=spec.auto_delete,
                    arguments=dict(spec.arguments),
                )
                for binding in spec.bindings:
                    channel.queue_bind(spec.name, binding.exchange, routing_key=binding.routing_key)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise channel_error(exc, "declare") from exc
        if remember:
            self._topology = merged

    def _redeclare(self) -> None:
        """Declare the remembered topology again, one queue at a time.

        On a cluster a queue can be unavailable while its node is down (a classic queue
        lives on one node): that one is logged and retried with its consumer, the others
        are declared all the same.
        """
        if not self._topology.exchanges and not self._topology.queues:
            return
        parts = [Topology(exchanges=self._topology.exchanges)]
        parts += [Topology(queues=(spec,)) for spec in self._topology.queues]
        for part in parts:
            try:
                self._declare_now(part, remember=False)
            except TransportError as exc:
                log.error("could not re-declare the topology", error=str(exc))

    def _declare_queue_of(self, consumer: _Consumer) -> None:
        """Re-declare the consumer's queue if the bus declared it (it may have been lost)."""
        spec = self._topology.queue(consumer.queue)
        if spec is not None:
            self._declare_now(Topology(queues=(spec,)), remember=False)

    def _publish_now(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool
    ) -> None:
        self._publish_on(self._pub_channel(), exchange, routing_key, body, properties, mandatory)

    @staticmethod
    def _publish_on(
        channel: Any,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Any,
        mandatory: bool,
    ) -> None:
        target = f"exchange {exchange!r} with routing key {routing_key!r}"
        try:
            channel.basic_publish(exchange, routing_key, body, properties, mandatory)
        except pika.exceptions.NackError as exc:
            raise PublishRefused(
                f"the broker refused a message to {target} "
                "(a full queue with reject-publish, or a broker-side error)"
            ) from exc
        except pika.exceptions.UnroutableError as exc:
            raise Unroutable(f"no queue is bound to {target}") from exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise channel_error(exc, f"publish to {target}") from exc

    def _admin_call(self, action: str, queue: str) -> int:
        channel = self._admin_channel()
        try:
            if action == "purge":
                frame = channel.queue_purge(queue)
            elif action == "delete":
                frame = channel.queue_delete(queue)
            else:
                frame = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise channel_error(exc, f"{action} {queue!r}") from exc
        return int(frame.method.message_count)

    def _get_now(self, queue: str) -> Delivery | None:
        # Passive check first: a 404 on the get channel would orphan its unacked messages.
        if self._admin_call("depth", queue) == 0:
            return None
        channel, lease = self._get_channel()
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        return _delivery(method, properties, body, _PikaHandle(channel, lease, method.delivery_tag))

    # -- settling ------------------------------------------------------------------------

    def _settle(self, delivery: Delivery, action: str, act: Callable[[_PikaHandle], None]) -> None:
        self._settle_all([delivery], action, act)

    def _settle_all(
        self, deliveries: Sequence[Delivery], action: str, act: Callable[[_PikaHandle], None]
    ) -> None:
        """Settle every delivery in one hand-over to the I/O thread (one wake-up, one wait)."""
        live: list[tuple[Delivery, _PikaHandle]] = []
        for delivery in deliveries:
            handle = _handle_of(delivery)
            if handle.channel is None:
                continue  # an RPC reply: auto-acknowledged, nothing to settle
            if handle.settled:
                raise AlreadySettled(f"message {delivery.message_id!r} was already settled")
            if not handle.lease.alive:
                handle.settled = True
                _log_dropped(action, delivery)
                continue
            live.append((delivery, handle))
        if not live:
            return

        def run() -> None:
            for delivery, handle in live:
                _settle_now(delivery, handle, action, act)

        try:
            self._submit(run, timeout=DEFAULT_SETTLE_TIMEOUT_S, what=action, internal=True)
        except ConnectionLost:
            for delivery, handle in live:
                if not handle.settled:
                    _log_dropped(action, delivery)

    # -- consumers -------------------------------------------------------------------------

    def _register_consumer(self, consumer: _Consumer) -> None:
        self._start_consumer(consumer)
        with self._lock:
            self._consumers[consumer.tag] = consumer

    def _start_consumer(self, consumer: _Consumer) -> None:
        if consumer.retry_at:
            # A retry: the queue may have gone with a cluster node; declaring it is idempotent.
            self._declare_queue_of(consumer)
        channel = self._connection().channel()
        lease = _Lease()
        try:
            channel.basic_qos(prefetch_count=consumer.prefetch)
            channel.add_on_cancel_callback(functools.partial(self._on_broker_cancel, consumer))
            channel.basic_consume(
                consumer.queue,
                functools.partial(self._on_message, consumer, lease),
                auto_ack=False,
                consumer_tag=consumer.tag,
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise channel_error(exc, f"consume {consumer.queue!r}") from exc
        consumer.channel, consumer.lease, consumer.broker_cancelled = channel, lease, False

    def _resume_consumers(self) -> None:
        with self._lock:
            consumers = list(self._consumers.values())
        for consumer in consumers:
            self._restart_consumer(consumer)

    def _heal_consumers(self) -> None:
        now = time.monotonic()
        with self._lock:
            consumers = list(self._consumers.values())
        for consumer in consumers:
            healthy = consumer.channel is not None and consumer.channel.is_open
            if (healthy and not consumer.broker_cancelled) or now < consumer.retry_at:
                continue
            self._restart_consumer(consumer)

    def _restart_consumer(self, consumer: _Consumer) -> None:
        consumer.lease.alive = False
        old, consumer.channel = consumer.channel, None
        if old is not None and old.is_open:
            try:
                old.close()  # the broker requeues what it still held
            except pika.exceptions.AMQPChannelError as exc:
                log.debug("error closing a consumer channel", error=repr(exc))
        try:
            self._start_consumer(consumer)
        except TransportError as exc:
            consumer.retry_at = time.monotonic() + CONSUMER_RETRY_INTERVAL_S
            log.warning("could not (re)start a consumer", queue=consumer.queue, error=str(exc))
        else:
            log.info("consumer started", queue=consumer.queue, tag=consumer.tag)

    def _on_message(
        self,
        consumer: _Consumer,
        lease: _Lease,
        channel: Any,
        method: Any,
        properties: Any,
        body: bytes,
    ) -> None:
        handle = _PikaHandle(channel, lease, method.delivery_tag)
        consumer.work.put(_delivery(method, properties, body, handle))

    def _on_broker_cancel(self, consumer: _Consumer, _frame: Any) -> None:
        consumer.broker_cancelled = True
        consumer.retry_at = time.monotonic() + CONSUMER_RETRY_INTERVAL_S
        log.warning("the broker cancelled a consumer (queue deleted?)", queue=consumer.queue)

    def _work(self, consumer: _Consumer) -> None:
        while True:
            delivery = consumer.work.get()
            if delivery is None or consumer.stopping.is_set():
                return  # what is still queued is requeued by the broker when the channel closes
            handle = _handle_of(delivery)
            if not handle.lease.alive:
                log.info(
                    "skipping a delivery from a closed channel; the broker redelivers it",
                    queue=consumer.queue,
                    message_id=delivery.message_id,
                )
                continue
            run_handler(self, consumer.handler, delivery, settled=handle.is_settled)

    def _stop_consumer(self, consumer: _Consumer) -> None:
        connected = self.is_connected
        try:
            if connected:  # otherwise the broker already dropped the consumer with the connection
                self._submit(
                    functools.partial(self._cancel_now, consumer),
                    timeout=CLOSE_GRACE_S,
                    what="cancel",
                    internal=True,
                )
        except TransportError as exc:
            log.warning("could not cancel a consumer cleanly", queue=consumer.queue, error=str(exc))
        consumer.stopping.set()
        consumer.work.put(None)
        if consumer.thread is not None and consumer.thread is not threading.current_thread():
            consumer.thread.join(CLOSE_GRACE_S)
            if consumer.thread.is_alive():
                log.warning("a handler is still running after close", queue=consumer.queue)
        if not self.is_connected:
            return
        try:
            self._submit(
                functools.partial(self._close_consumer_channel, consumer),
                timeout=CLOSE_GRACE_S,
                what="close consumer channel",
                internal=True,
            )
        except TransportError as exc:
            log.warning("could not close a consumer channel", queue=consumer.queue, error=str(exc))

    def _cancel_now(self, consumer: _Consumer) -> None:
        if consumer.channel is not None and consumer.channel.is_open:
            consumer.channel.basic_cancel(consumer.tag)

    def _close_consumer_channel(self, consumer: _Consumer) -> None:
        consumer.lease.alive = False
        channel, consumer.channel = consumer.channel, None
        if channel is not None and channel.is_open:
            channel.close()

    # -- RPC --------------------------------------------------------------------------------

    def _call_once(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, deadline: float
    ) -> Delivery:
        correlation_id: str = properties.correlation_id
        reply: Future[Delivery] = Future()
        with self._lock:
            self._rpc_waiters[correlation_id] = reply
        try:
            self._submit(
                functools.partial(self._rpc_publish_now, exchange, routing_key, body, properties),
                timeout=deadline - time.monotonic(),
                what=f"request to {exchange!r}",
            )
            return reply.result(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                self._rpc_waiters.pop(correlation_id, None)

    def _rpc_publish_now(
        self, exchange: str, routing_key: str, body: bytes, properties: Any
    ) -> None:
        channel = self._rpc_channel()
        try:
            self._publish_on(channel, exchange, routing_key, body, properties, mandatory=True)
        except TransportError:
            if not channel.is_open:
                # Replies to other callers were bound to that channel: let them retry.
                self._fail_rpc_waiters(
                    ConnectionLost("the reply channel closed"), keep=properties.correlation_id
                )
            raise

    def _on_rpc_reply(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        with self._lock:
            waiter = self._rpc_waiters.get(properties.correlation_id)
        if waiter is None or waiter.done():
            log.debug("dropping a late or unknown reply", correlation_id=properties.correlation_id)
            return
        waiter.set_result(_delivery(method, properties, body, _PikaHandle(None, _Lease(), 0)))

    def _fail_rpc_waiters(self, error: TransportError, *, keep: str | None = None) -> None:
        with self._lock:
            waiters = [w for cid, w in self._rpc_waiters.items() if cid != keep]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)


# -- helpers ---------------------------------------------------------------------------------


def _noop() -> None:
    """Wake-up callback: its only effect is making `process_data_events` return."""


def _settle_now(
    delivery: Delivery, handle: _PikaHandle, action: str, act: Callable[[_PikaHandle], None]
) -> None:
    """On the I/O thread: settle one delivery unless it was settled or its channel closed."""
    if handle.settled:
        raise AlreadySettled(f"message {delivery.message_id!r} was already settled")
    handle.settled = True
    if not handle.lease.alive or not handle.channel.is_open:
        _log_dropped(action, delivery)
        return
    try:
        act(handle)
    except Exception:
        # Still settleable (e.g. the dead-letter copy was refused) unless its channel died.
        handle.settled = not handle.channel.is_open
        raise


def _basic_ack(handle: _PikaHandle) -> None:
    handle.channel.basic_ack(handle.delivery_tag)


def _basic_reject(handle: _PikaHandle) -> None:
    handle.channel.basic_reject(handle.delivery_tag, requeue=False)


def _log_dropped(action: str, delivery: Delivery) -> None:
    log.warning(
        f"{action} dropped: the delivery's connection or channel closed; the broker redelivers it",
        message_id=delivery.message_id,
        routing_key=delivery.routing_key,
    )


def _handle_of(delivery: Delivery) -> _PikaHandle:
    if not isinstance(delivery.handle, _PikaHandle):
        raise TypeError("this delivery did not come from a PikaBus")
    return delivery.handle


def _wait(future: Future[T], timeout: float, what: str) -> T:
    try:
        return future.result(timeout=max(0.0, timeout))
    except TimeoutError:
        if future.cancel():
            raise ConnectionLost(
                f"{what} did not run within {timeout:.1f}s: broker unreachable or connection busy"
            ) from None
    try:
        return future.result(timeout=RUNNING_OP_GRACE_S)
    except TimeoutError:
        raise ConnectionLost(f"{what} is still unfinished after its timeout") from None


def _lost(exc: BaseException) -> TransportError:
    return _chain(ConnectionLost(f"the connection to the broker was lost: {exc!r}"), exc)


def _chain(error: TransportError, cause: BaseException) -> TransportError:
    error.__cause__ = cause
    return error


def _delivery(method: Any, properties: Any, body: bytes | None, handle: _PikaHandle) -> Delivery:
    return Delivery(
        body=bytes(body or b""),
        properties=from_pika_properties(properties),
        exchange=str(method.exchange),
        routing_key=str(method.routing_key),
        redelivered=bool(method.redelivered),
        handle=handle,
    )
