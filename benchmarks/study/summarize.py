"""Markdown tables (and summary JSON) again from saved study results, without rerunning.

uv run python -m benchmarks.study.summarize benchmarks/results/study-*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.study.data import Partition
from benchmarks.study.output import markdown_table, summary_document, write_json
from benchmarks.study.runner import RunOutcome
from benchmarks.study.spec import RunSpec
from services.aggregator.strategies.factory import StrategyConfig


def outcome_from_json(run: dict[str, Any], *, study_budget_s: float) -> RunOutcome:
    """A saved run back as a `RunOutcome` (its spec rebuilt from the saved description)."""
    strategy = run["strategy"]
    spec = RunSpec(
        name=run["name"],
        strategy=None if strategy is None else StrategyConfig.model_validate(strategy),
        partition=_partition(run["partition"]),
        stragglers=run["stragglers"],
        attackers=run["attackers"],
        attack_scale=run["attack_scale"] or 1.0,
        budget_factor=run["budget_factor"],
    )
    return RunOutcome(
        spec=spec, run_dir=Path(run["run_dir"]), summary=run["summary"],
        statistics=run["statistics"], points=run["points"], real_seconds=run["real_seconds"],
        budget_s=run.get("budget_s", study_budget_s * run["budget_factor"]),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study.summarize")
    parser.add_argument("results", nargs="+", type=Path, help="study JSON files")
    parser.add_argument("--figures-dir", type=Path, help="rewrite each small summary JSON here")
    args = parser.parse_args()
    for path in args.results:
        document = json.loads(path.read_text(encoding="utf-8"))
        budget = document["settings"]["budget_s"]
        outcomes = [outcome_from_json(run, study_budget_s=budget) for run in document["runs"]]
        print(f"### {document['name']}\n\n    {document['command']}\n")
        print(markdown_table(outcomes))
        if args.figures_dir is not None:
            header = {k: v for k, v in document.items() if k != "runs"}
            write_json(args.figures_dir / path.name, summary_document(header, outcomes))


def _partition(label: str) -> Partition:
    if label == "IID":
        return Partition("iid")
    return Partition("dirichlet", alpha=float(label.split()[-1]))


if __name__ == "__main__":
    main()
