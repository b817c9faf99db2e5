"""Start and stop real fedmq processes for integration and end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """A `fedmq <command>` child process whose output goes to a log file."""

    def __init__(
        self, args: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        environment = dict(os.environ)
        environment.update(env or {})
        environment.setdefault("FEDMQ_LOG_JSON", "true")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *self.args],
            cwd=REPO,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.popen.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after `timeout`); return the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash with no chance to clean up."""
        self.popen.kill()
        self.popen.wait()
        self._log.close()

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")


def wait_for(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.2, what: str = ""
) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or condition}")
