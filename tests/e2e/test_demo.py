"""`fedmq demo` end to end: a short run writes a summary, a manifest, an eval log and a report.

It runs as a newcomer's first command would: no `--data-dir`, no `~/.medmnist`, no way to
download anything, so the bundled PneumoniaMNIST is what it trains on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]


def _offline_environment(home: Path) -> dict[str, str]:
    """A fresh user's environment: empty HOME, no data directory, every proxy a dead port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_DATA")}
    home.mkdir()
    proxies = {name: dead for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    return environment | proxies | {"HOME": str(home), "NO_PROXY": "", "no_proxy": ""}


def test_a_short_demo_without_data_flags_trains_offline_on_the_bundled_copy(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "demo"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--trainers",
            "2",
            "--duration",
            "90",
            "--run-dir",
            str(run_dir),
            "--no-live",
            "--aggregator-flag=--local-steps=10",
            "--aggregator-flag=--buffer-size=2",
        ],
        cwd=REPO,
        env=_offline_environment(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "fedmq demo summary" in completed.stdout
    assert "all stopped cleanly" in completed.stdout
    assert "using the bundled dataset" in completed.stdout + completed.stderr
    assert not (tmp_path / "home" / ".medmnist").exists()
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["kind"] == "federated" and manifest["strategy"] == "fedbuff"
    evaluations = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert len(evaluations) >= 2
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in evaluations)
    versions = [e["version"] for e in evaluations]
    assert versions == sorted(versions) and versions[-1] > 0
    report = run_dir / "report"
    assert (report / "report.png").stat().st_size > 10_000
    assert "best" in (report / "report.md").read_text().lower()
