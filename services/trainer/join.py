"""Joining a task by RPC: ask until an aggregator answers, with backoff, within a deadline.

Used by trainers and by the evaluator (which joins with `role="evaluator"` to learn the
task spec and the current model).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from schemas import DecodeError, JoinAccepted, JoinRequest, Rejection
from services.common.bus import Bus, ConnectionLost, RpcTimeout, TransportError
from services.common.messaging import call_message
from services.common.topology import CONTROL_EXCHANGE, join_key
from services.trainer.backoff import Backoff

JOIN_RPC_TIMEOUT_S = 10.0
"""How long one join request waits for its reply before it is asked again."""


class JoinFailed(Exception):
    """The participant could not join its task."""


class JoinRefused(JoinFailed):
    """The aggregator answered with a `Rejection` (unknown task, unauthorised trainer, ...)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"join refused: {rejection.reason}: {rejection.detail}")
        self.rejection = rejection


class JoinTimedOut(JoinFailed):
    """No aggregator answered before the join deadline."""


def join_task(
    bus: Bus,
    request: JoinRequest,
    *,
    timeout: float,
    stop: threading.Event,
    backoff: Backoff | None = None,
    rpc_timeout: float = JOIN_RPC_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
    user_id: str | None = None,
) -> JoinAccepted | None:
    """Send `request` until it is accepted; None if `stop` was set meanwhile.

    Raises `JoinRefused` on a `Rejection`, `JoinTimedOut` after `timeout` seconds without
    an answer, `JoinFailed` when the reply cannot be decoded.
    """
    log = structlog.get_logger(__name__).bind(task=request.task_id, who=request.trainer_id)
    pause = backoff or Backoff()
    deadline = clock() + timeout
    attempt = 0
    while not stop.is_set():
        attempt += 1
        left = deadline - clock()
        if left <= 0:
            raise JoinTimedOut(f"no aggregator answered within {timeout:g} s ({attempt - 1} tries)")
        reply = _ask_once(
            bus, request, timeout=min(rpc_timeout, left), log=log, attempt=attempt, user_id=user_id
        )
        if isinstance(reply, JoinAccepted):
            return reply
        if isinstance(reply, Rejection):
            raise JoinRefused(reply)
        stop.wait(min(pause.next_delay(), max(deadline - clock(), 0.0)))
    return None


def _ask_once(
    bus: Bus,
    request: JoinRequest,
    *,
    timeout: float,
    log: structlog.typing.FilteringBoundLogger,
    attempt: int,
    user_id: str | None,
) -> JoinAccepted | Rejection | None:
    # A fresh `sent_at` per attempt: the aggregator sees when this request was made.
    fresh = request.model_copy(update={"sent_at": time.time()})
    try:
        reply = call_message(
            bus,
            CONTROL_EXCHANGE,
            join_key(request.task_id),
            fresh,
            accept=(JoinAccepted, Rejection),
            timeout=timeout,
            user_id=user_id,
        )
    except RpcTimeout:
        log.info("no aggregator answered the join request yet", attempt=attempt)
    except ConnectionLost as error:
        log.warning("broker unreachable while joining", attempt=attempt, error=str(error))
    except DecodeError as error:
        raise JoinFailed(f"unreadable join reply: {error}") from error
    except TransportError as error:
        # Unroutable (control queue not declared yet: no aggregator ever ran) and friends.
        log.info("join request not delivered", attempt=attempt, error=str(error))
    else:
        if isinstance(reply, JoinAccepted | Rejection):
            return reply
    return None
