"""`fedmq demo` end to end: a short run writes a summary, a manifest, an eval log and a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datagen import pneumonia_npz
from tests.support.processes import REPO

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]


def test_a_short_demo_prints_a_summary_and_writes_a_sane_report(tmp_path: Path) -> None:
    npz = pneumonia_npz(tmp_path / "data")
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
            "--data-dir",
            str(npz.parent),
            "--run-dir",
            str(run_dir),
            "--no-live",
            "--aggregator-flag=--local-steps=10",
            "--aggregator-flag=--buffer-size=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "fedmq demo summary" in completed.stdout
    assert "all stopped cleanly" in completed.stdout
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
