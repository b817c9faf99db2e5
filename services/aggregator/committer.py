"""Runs the aggregator's commits (checkpoint, publish, ack) on a thread of their own.

The engine keeps decoding and applying updates while the previous version is written,
fsynced and published, so disk and broker round trips overlap with the math. Commits still
run one at a time and in version order, and each acks only deliveries whose effect its own
checkpoint (or an earlier one) holds: ack-after-durable is unchanged.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from services.aggregator.checkpoint import Checkpoint
from services.common.bus import Delivery


@dataclass(frozen=True)
class Commit:
    """One unit of durability, snapshotted by the engine: what to write, publish and ack."""

    checkpoint: Checkpoint | None
    """The state to make durable; None when only acks are due (their effect is durable)."""
    to_ack: list[Delivery]
    active_trainers: int
    mean_staleness: float
    epsilon: float | None


class Committer:
    """One worker thread performing `Commit`s one at a time; errors resurface on the engine."""

    def __init__(self, perform: Callable[[Commit], None], *, on_done: Callable[[], None]) -> None:
        self._perform = perform
        self._on_done = on_done
        self._jobs: queue.Queue[Commit | None] = queue.Queue(maxsize=1)
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fedmq-committer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a commit is being performed right now."""
        return not self._idle.is_set()

    def submit(self, commit: Commit) -> None:
        """Start `commit` in the background (the caller checked that none is running)."""
        self.check()
        self._idle.clear()
        self._jobs.put(commit)

    def wait_idle(self) -> None:
        """Block until the running commit (if any) finished; raise what it raised."""
        self._idle.wait()
        self.check()

    def check(self) -> None:
        """Raise the error of a failed commit: the engine must not go on without durability."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Finish the running commit and stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (commit := self._jobs.get()) is not None:
            try:
                self._perform(commit)
            except BaseException as error:  # re-raised on the engine thread by `check`
                self._error = error
            finally:
                self._idle.set()
                self._on_done()
