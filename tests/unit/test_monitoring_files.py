"""infra/monitoring parses: a Grafana dashboard and Prometheus alert rules over fedmq's metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.support.processes import REPO

MONITORING = REPO / "infra" / "monitoring"
METRIC = re.compile(r"\b((?:fedmq|process)_[a-z0-9_]+)\b")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def queried_metrics() -> set[str]:
    exprs = dashboard_exprs() + [rule["expr"] for rule in rules()]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def test_the_dashboard_is_grafana_json_with_one_query_per_panel_at_least() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "fedmq-overview"
    assert all(panel["targets"] and panel["title"] for panel in dashboard["panels"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_alert_rules_cover_stalls_dead_letters_and_silent_trainers() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert {"FedmqNoUpdateApplied", "FedmqDeadLettersRising", "FedmqTrainerSilent"} <= set(by_name)
    for rule in by_name.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert re.fullmatch(r"\d+m", rule["for"])
        assert rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_alert_rules() -> None:
    completed = subprocess.run(
        ["promtool", "check", "rules", str(MONITORING / "alerts.yaml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_kubernetes_overlay_carries_the_same_rules_and_dashboard() -> None:
    overlay = REPO / "infra" / "k8s" / "overlays" / "monitoring"
    rule = yaml.safe_load((overlay / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    dashboard = (overlay / "grafana-dashboard.json").read_text()
    assert dashboard == (MONITORING / "grafana-dashboard.json").read_text()
    monitor = yaml.safe_load((overlay / "podmonitor.yaml").read_text())
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
