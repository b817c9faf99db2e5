"""A private RabbitMQ node beside the machine's broker, for tests that restart or reconfigure one.

Tests that stop the broker or need another listener (TLS) must not disturb the shared node
every other test uses, so they start their own: its own node name, config file, data
directory, distribution port and AMQP port, started with `rabbitmq-server -detached` and
stopped with `rabbitmqctl -n NODE stop`. Starting one takes a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

RABBITMQ_USER: Final = "rabbitmq"
START_TIMEOUT_S: Final = 90.0
CTL_TIMEOUT_S: Final = 120.0


class PrivateBrokerError(RuntimeError):
    """The private node did not start or stop; the message holds the tail of its log."""


def rabbitmq_installed() -> bool:
    """Whether the RabbitMQ server scripts are on PATH."""
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class PrivateBroker:
    """One RabbitMQ node of the test's own, living under `directory`.

    `config_lines` are appended to the generated `rabbitmq.conf` (for a TLS listener, say);
    the plain AMQP listener is always on `amqp_port` of 127.0.0.1, for the guest account.
    """

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fedmq-broker-")))
    config_lines: Sequence[str] = ()
    amqp_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    node: str = field(default_factory=lambda: f"fedmqtest-{uuid.uuid4().hex[:8]}@localhost")
    cookie: str | None = None
    """Erlang cookie of this node and of the `rabbitmqctl` calls made on it; None: the
    machine's (that of the broker user). Cluster members share one of their own."""

    @property
    def amqp_url(self) -> str:
        """URL of the plain listener with the guest account on the default vhost."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def pid_file(self) -> Path:
        return self.directory / "node.pid"

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"

    def write_config(self) -> None:
        """The node's config and (empty) plugin list, readable by the broker's own user."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}", *self.config_lines]
        (self.directory / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        # The machine's plugin list may enable the management UI on a fixed port.
        (self.directory / "enabled_plugins").write_text("[].\n")
        self._hand_to_broker_user()

    def environment(self) -> dict[str, str]:
        """Environment that points the server scripts at this node instead of the shared one."""
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_CONFIG_FILE=str(self.directory / "rabbitmq.conf"),
            RABBITMQ_MNESIA_BASE=str(self.directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.directory / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pid_file),
        )
        if self.cookie is not None:
            # A cookie of its own keeps the node (and rabbitmqctl) away from the shared broker.
            env.update(
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=f"-setcookie {self.cookie}",
                RABBITMQ_CTL_ERL_ARGS=f"-setcookie {self.cookie}",
            )
        return env

    def start(self) -> None:
        """Start the node (`rabbitmq-server -detached`) and wait until it accepts AMQP."""
        self.launch()
        self.wait_started()

    def launch(self) -> None:
        """`rabbitmq-server -detached` without waiting: several nodes boot side by side."""
        if not (self.directory / "rabbitmq.conf").exists():
            self.write_config()
        self._hand_to_broker_user()
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self.environment(),
            check=True,
            capture_output=True,
            timeout=CTL_TIMEOUT_S,
        )

    def wait_started(self) -> None:
        """Wait until a launched node runs and accepts AMQP."""
        self._ctl("wait", str(self.pid_file), "--timeout", str(int(START_TIMEOUT_S)))
        self._wait_for_listener(open_=True)

    def stop_app(self) -> None:
        """Stop the RabbitMQ application; the Erlang node stays up (`rabbitmqctl stop_app`)."""
        self._ctl("stop_app")
        self._wait_for_listener(open_=False)

    def start_app(self) -> None:
        """Start the application again after `stop_app`."""
        self._ctl("start_app")
        self._wait_for_listener(open_=True)

    def stop(self) -> None:
        """Stop the whole node (`rabbitmqctl stop`) and wait for its OS process to exit."""
        self._ctl("stop", str(self.pid_file))
        self._wait_for_listener(open_=False)

    def restart(self) -> None:
        """A full stop and a fresh `rabbitmq-server -detached`; durable state survives."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the node's OS process (by its pid file) when `stop` failed."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def ctl(self, *args: str) -> str:
        """Run `rabbitmqctl -n NODE ARGS...` and return its standard output."""
        return self._ctl(*args)

    def _ctl(self, *args: str) -> str:
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise PrivateBrokerError(
                f"rabbitmqctl {' '.join(args)} failed on {self.node}: "
                f"{result.stderr.strip()[-800:]}\n{self.log_tail()}"
            )
        return result.stdout

    def _wait_for_listener(self, *, open_: bool) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _port_open(self.amqp_port) != open_:
            if time.monotonic() > deadline:
                state = "open" if open_ else "close"
                raise PrivateBrokerError(
                    f"{self.node}: port {self.amqp_port} did not {state}\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def listening(self) -> bool:
        """Whether the node's AMQP listener accepts connections right now."""
        return _port_open(self.amqp_port)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's log, for error messages."""
        logs = sorted(self.log_dir.glob("*.log")) if self.log_dir.exists() else []
        if not logs:
            return "(no broker log)"
        text = logs[-1].read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _hand_to_broker_user(self) -> None:
        # Started as root, the server scripts drop to the `rabbitmq` user, which must own its
        # data directory and be able to read the certificates a test put there (so the
        # directory lives in /tmp itself, not under pytest's private tmp_path).
        if os.geteuid() != 0:
            return
        try:
            shutil.chown(self.directory, RABBITMQ_USER, RABBITMQ_USER)
        except (LookupError, PermissionError):
            return
        for path in self.directory.rglob("*"):
            shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)


@contextmanager
def running_private_broker(
    config_lines: Sequence[str] = (), *, directory: Path | None = None
) -> Iterator[PrivateBroker]:
    """A started private node, stopped (whatever state the test left it in) and removed on exit.

    `directory` (default: a fresh one in /tmp) may already hold files the node must read,
    such as TLS certificates named in `config_lines`; it is removed on exit too.
    """
    if directory is None:
        broker = PrivateBroker(config_lines=config_lines)
    else:
        broker = PrivateBroker(directory=directory, config_lines=config_lines)
    broker.write_config()
    broker.start()
    try:
        yield broker
    finally:
        try:
            broker.stop()
        except PrivateBrokerError:
            broker.kill()
        shutil.rmtree(broker.directory, ignore_errors=True)
