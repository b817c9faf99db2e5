"""Broker failures at start-up, against the real broker: one line, an exit code, no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from services.common.bus import NotFound
from services.common.bus.pika_bus import PikaBus
from services.common.errors import EXIT_BROKER_REFUSED, EXIT_BROKER_UNREACHABLE, EXIT_CHILD_DIED
from services.common.topology import follower_queue_name, updates_queue
from tests.datagen import pneumonia_npz
from tests.support.processes import REPO

pytestmark = [pytest.mark.broker]


def _fedmq(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    environment = {**os.environ, "FEDMQ_LOG_JSON": "true", **(env or {})}
    completed = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return completed.returncode, completed.stderr


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit(parts._replace(netloc=netloc))


def _closed_port_url(url: str) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{port}"))


def _last_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    # pika's own lines stay hidden at the default level
    assert "pika." not in stderr and "AMQPConnectorSocketConnectError" not in stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["aggregator", "topology"])
def test_a_wrong_password_is_one_line_with_the_refused_exit_code(
    amqp_url: str, command: str
) -> None:
    # Given the real broker and a wrong password, when a command starts
    code, stderr = _fedmq(command, "--amqp-url", _with_password(amqp_url, "not-the-password"))
    # Then it exits with the documented code and says what to fix in one line
    line = _last_line(stderr)
    assert code == EXIT_BROKER_REFUSED, stderr
    assert line.startswith(f"fedmq {command}: error: the broker at ")
    assert "refused the login" in line and "FEDMQ_AMQP_URL" in line
    assert "not-the-password" not in stderr


def test_a_closed_port_is_one_line_after_the_connect_timeout(amqp_url: str) -> None:
    # Given a port nothing listens on and a 2 s connect timeout
    url = _closed_port_url(amqp_url)
    code, stderr = _fedmq(
        "trainer", "--trainer-id", "site-0", "--amqp-url", url, "--connect-timeout", "2"
    )
    line = _last_line(stderr)
    assert code == EXIT_BROKER_UNREACHABLE, stderr
    assert line.startswith("fedmq trainer: error: no broker answered at ")
    assert "within 2s (last error: Connection refused)" in line
    assert "start RabbitMQ" in line


@pytest.mark.e2e
@pytest.mark.slow
def test_the_demo_stops_and_names_the_process_that_died(amqp_url: str, tmp_path: Path) -> None:
    # Given a demo whose aggregator is given an invalid buffer size, so it dies at start-up
    npz = pneumonia_npz(tmp_path / "data")
    code, stderr = _fedmq(
        "demo", "--trainers", "1", "--duration", "120", "--no-live",
        "--data-dir", str(npz.parent), "--run-dir", str(tmp_path / "run"),
        "--aggregator-flag=--buffer-size=0",
        env={"FEDMQ_AMQP_URL": amqp_url},
        timeout=150,
    )  # fmt: skip
    # Then the demo stops well before its budget, naming the process and its own error line
    line = _last_line(stderr)
    assert code == EXIT_CHILD_DIED, stderr
    assert line.startswith("fedmq demo: error: the aggregator process exited with code 2: ")
    assert "fedmq aggregator: error: " in line and "buffer_size" in line
    assert "logs/aggregator.log" in line
    # and it removed its task's queues from the broker
    task = json.loads((tmp_path / "run" / "run.json").read_text())["config"]["task_id"]
    with PikaBus(amqp_url) as bus:
        for queue in (updates_queue(task), follower_queue_name(task, "site-0")):
            with pytest.raises(NotFound):
                bus.queue_depth(queue)
