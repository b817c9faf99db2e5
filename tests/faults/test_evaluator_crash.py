"""SIGKILL the evaluator between versions: it resumes from the newest model, not from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.aggregator.best import history, load_best, task_checkpoint_dir
from tests.support.fault_kit import FaultFederation, log_events, wait_serving
from tests.support.probe import FederationProbe
from tests.support.processes import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow, pytest.mark.e2e]


def _logged_versions(path: Path) -> list[int]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [line["version"] for line in lines if line["split"] == "val"]


def test_a_killed_evaluator_resumes_at_the_newest_model_without_evaluating_again(
    federation: FaultFederation,
) -> None:
    """After SIGKILL and restart, versions in the JSONL log stay strictly increasing and the
    first new report is the newest version; the ones published meanwhile are skipped."""
    aggregator = federation.aggregator("--strategy", "fedasync", "--alpha", "0.5")
    eval_log = federation.run_dir / "eval.jsonl"
    evaluator = federation.evaluator(eval_log)
    wait_serving(aggregator)
    with federation.bus() as bus:
        probe = FederationProbe(bus, federation.task_id, "probe", amqp_url=federation.amqp_url)
        model = probe.join().model
        # Given an evaluator that logged versions 0..2
        for _ in range(2):
            probe.publish(probe.update(model, 1e-3))
            model = probe.newest_model(min_version=model.version + 1)
            wait_for(lambda v=model.version: v in _logged_versions(eval_log), timeout=120,
                     what=f"version {model.version} evaluated")  # fmt: skip
        before = _logged_versions(eval_log)
        # When it is SIGKILLed, three versions are published, and it is started again
        evaluator.kill()
        for _ in range(3):
            probe.publish(probe.update(model, 1e-3))
            model = probe.newest_model(min_version=model.version + 1)
        evaluator = federation.evaluator(eval_log)
        wait_for(lambda: model.version in _logged_versions(eval_log), timeout=120,
                 what="the newest version evaluated")  # fmt: skip
    # Then it resumed after its log and evaluated only the newest model
    (resumed,) = log_events(evaluator, "resuming after the logged versions")
    after = _logged_versions(eval_log)[len(before) :]
    assert resumed["last"] == before[-1] == 2
    assert after == [model.version] == [5]
    assert _logged_versions(eval_log) == sorted(set(_logged_versions(eval_log)))
    assert evaluator.terminate() == 0
    # and the best version on val survived the kill: one record per improvement, the one
    # kept among the evaluated versions, readable by load_best
    task_dir = task_checkpoint_dir(federation.checkpoint_root, federation.task_id)
    selections = [line["version"] for line in history(task_dir)]
    best = load_best(task_dir)
    assert best is not None and best.version in _logged_versions(eval_log)
    assert selections == sorted(set(selections)) and selections[-1] == best.version
    print(f"\nFAULTS evaluator before={before} after_restart={after}")
