"""Every metric the dashboard and the alert rules query is served by a running fedmq process."""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.processes import ServiceProcess, wait_for
from tests.unit.test_monitoring_files import queried_metrics

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]


def _bound_port(process: ServiceProcess) -> int | None:
    for line in process.output().splitlines():
        if '"metrics_serving"' in line:
            return int(json.loads(line)["port"])
    return None


def _exposed(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = set(re.findall(r"^# TYPE (\S+)", text, flags=re.M))
    names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, flags=re.M))
    return names


def test_every_metric_the_dashboard_and_rules_query_exists_on_a_running_service(
    amqp_url: str, tmp_path: Path
) -> None:
    # Given an aggregator, a trainer and an evaluator, each serving metrics on a free port
    task = f"monitor-{uuid.uuid4().hex[:8]}"
    env = {"FEDMQ_AMQP_URL": amqp_url, "FEDMQ_TASK_ID": task, "FEDMQ_METRICS_PORT": "0"}
    processes = [
        ServiceProcess(
            ["aggregator", "--checkpoint-dir", str(tmp_path / "ckpt")],
            log_path=tmp_path / "aggregator.log", env=env,
        ),
        ServiceProcess(
            ["trainer", "--trainer-id", "site-0"], log_path=tmp_path / "trainer.log", env=env
        ),
        ServiceProcess(
            ["evaluator", "--checkpoint-dir", str(tmp_path / "ckpt")],
            log_path=tmp_path / "evaluator.log", env=env,
        ),
    ]  # fmt: skip
    try:
        # When each logs its bound port and is scraped
        wait_for(
            lambda: all(_bound_port(p) is not None for p in processes),
            timeout=120, what="every process to log its metrics port",
        )  # fmt: skip
        time.sleep(0.5)
        exposed = set().union(*(_exposed(port) for p in processes if (port := _bound_port(p))))
    finally:
        for process in processes:
            process.terminate()
    # Then nothing the dashboard or the rules query is missing
    assert queried_metrics() - exposed == set()
    assert {"process_cpu_seconds_total", "fedmq_trainer_updates_sent_total"} <= exposed
