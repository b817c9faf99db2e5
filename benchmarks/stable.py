"""Does the global model stay good under label skew? Real processes, real data, JSON out.

Each run is a whole federation as `fedmq demo` starts it (aggregator, evaluator, trainers as
`fedmq` processes on the real broker, PneumoniaMNIST partitioned with Dirichlet label skew)
with the shipped defaults unless `--aggregator-flag` says otherwise. Scenarios:

- `demo`: the demo's defaults, 4 sites, Dirichlet 0.5;
- `stragglers`: 8 sites, Dirichlet 0.5, sites 6 and 7 five times slower.

Per run, from the evaluator's log (test split, times from the run's start) and its `best`
artifact (selected on val): the minimum test accuracy of the versions published after
`--warmup` seconds, the mean and minimum over the last 30 s, AUC, the test accuracy of the
val-selected version, the final version's, and whether each target is met. The
majority-class rate of the test split is the baseline a collapsed model sits on.

    uv run python -m benchmarks.stable --data-dir DIR --seeds 0,1,2 --duration 120
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, unique_task_id
from services.aggregator.best import load_best, task_checkpoint_dir
from services.demo.federation import Federation, FederationPlan
from services.report.logs import load_run
from services.report.manifest import RunManifest, write_manifest
from services.report.summary import TAIL_WINDOW_S, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP_S = 60.0
TARGETS = {
    "min_after_warmup": 0.85,
    "tail_mean_accuracy": 0.88,
    "auc": 0.95,
    "selected_accuracy": 0.89,
}


@dataclass(frozen=True)
class Scenario:
    """One federation shape of the benchmark."""

    name: str
    trainers: int
    stragglers: int
    alpha: float = 0.5


SCENARIOS = {
    "demo": Scenario("demo", trainers=4, stragglers=0),
    "stragglers": Scenario("stragglers", trainers=8, stragglers=2),
}


def run_one(
    scenario: Scenario,
    seed: int,
    *,
    duration: float,
    data_dir: Path,
    runs_dir: Path,
    aggregator_flags: Sequence[str],
) -> dict[str, Any]:
    """Run one federation for `duration` seconds; its numbers and targets as a dict."""
    task_id = unique_task_id(f"stable-{scenario.name}-{seed}")
    run_dir = runs_dir / task_id
    plan = FederationPlan(
        task_id=task_id, run_dir=run_dir, trainers=scenario.trainers, strategy="fedbuff",
        partition="dirichlet", dirichlet_alpha=scenario.alpha, stragglers=scenario.stragglers,
        data_dir=data_dir, seed=seed, aggregator_flags=tuple(aggregator_flags),
    )  # fmt: skip
    started_at = time.time()
    write_manifest(
        run_dir,
        RunManifest(
            name=f"{scenario.name} seed {seed}", kind="federated", strategy="fedbuff",
            model="cnn-small", started_at=started_at,
            config={"trainers": scenario.trainers, "stragglers": scenario.stragglers,
                    "dirichlet_alpha": scenario.alpha, "seed": seed},
        ),
    )  # fmt: skip
    federation = Federation(plan)
    federation.start()
    try:
        time.sleep(duration)
    finally:
        codes = federation.stop()
    return _measure(run_dir, task_id, scenario, seed, codes)


def _measure(
    run_dir: Path, task_id: str, scenario: Scenario, seed: int, codes: dict[str, int]
) -> dict[str, Any]:
    run = load_run(run_dir)
    summary = summarize(run)
    after = [p for p in run.points if p.seconds >= WARMUP_S]
    after_aucs = [p.auc for p in after if p.auc is not None]
    best = load_best(task_checkpoint_dir(run_dir / "checkpoints", task_id))
    best_test = None if best is None or best.test is None else best.test["accuracy"]
    numbers = {
        "min_after_warmup": min((p.accuracy for p in after), default=None),
        "tail_mean_accuracy": summary.tail_mean_accuracy,
        "auc": summary.tail_mean_auc,
        "selected_accuracy": summary.selected_accuracy,
    }
    return {
        "scenario": scenario.name,
        "seed": seed,
        "task_id": task_id,
        "run_dir": str(run_dir),
        "evaluations": summary.evaluations,
        "versions": run.points[-1].version,
        "updates_applied": run.points[-1].updates,
        "first_version_s": run.points[1].seconds if len(run.points) > 1 else None,
        "min_accuracy_after_warmup": numbers["min_after_warmup"],
        "evaluations_after_warmup": len(after),
        "min_auc_after_warmup": min(after_aucs, default=None),
        "tail_window_s": TAIL_WINDOW_S,
        "tail_mean_accuracy": summary.tail_mean_accuracy,
        "tail_min_accuracy": summary.tail_min_accuracy,
        "tail_mean_auc": summary.tail_mean_auc,
        "tail_min_auc": summary.tail_min_auc,
        "selected_version": summary.selected_version,
        "selected_val_balanced_accuracy": summary.selected_val_score,
        "selected_test_accuracy": summary.selected_accuracy,
        "selected_test_auc": summary.selected_auc,
        "best_artifact_version": None if best is None else best.version,
        "best_artifact_test_accuracy": best_test,
        "final_accuracy": summary.final_accuracy,
        "final_auc": summary.final_auc,
        "best_test_accuracy_optimistic_bound": summary.best_accuracy,
        "majority_rate": summary.majority_rate,
        "targets": {name: _target(target, numbers[name]) for name, target in TARGETS.items()},
        "exit_codes": codes,
    }


def _target(target: float, value: float | None) -> dict[str, Any]:
    return {"target": target, "value": value, "met": value is not None and value >= target}


def _spread(runs: Sequence[dict[str, Any]], key: str) -> dict[str, float | None]:
    values = [r[key] for r in runs if r[key] is not None]
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds pneumoniamnist.npz")
    parser.add_argument("--scenarios", default="demo,stragglers")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per run")
    parser.add_argument(
        "--aggregator-flag", action="append", default=[], dest="aggregator_flags",
        help="extra `fedmq aggregator` flag (repeat; e.g. --aggregator-flag=--server-lr=1)",
    )  # fmt: skip
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs" / "stable")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    started = machine()
    runs = []
    for name in args.scenarios.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            result = run_one(
                SCENARIOS[name], seed, duration=args.duration, data_dir=args.data_dir,
                runs_dir=args.runs_dir, aggregator_flags=args.aggregator_flags,
            )  # fmt: skip
            runs.append(result)
            print(json.dumps(_short(result)), file=sys.stderr, flush=True)
    keys = ("min_accuracy_after_warmup", "tail_mean_accuracy", "tail_mean_auc",
            "selected_test_accuracy", "final_accuracy")  # fmt: skip
    document = {
        "benchmark": "stable",
        "command": "uv run python -m benchmarks.stable " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
        "warmup_s": WARMUP_S,
        "aggregator_flags": args.aggregator_flags,
        "targets": TARGETS,
        "runs": runs,
        "spread": {
            name: {key: _spread([r for r in runs if r["scenario"] == name], key) for key in keys}
            for name in args.scenarios.split(",")
        },
        "all_targets_met": all(t["met"] for r in runs for t in r["targets"].values()),
        "machine_at_start": started,
        "machine_at_end": machine(),
    }
    text = json.dumps(document, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _short(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "scenario", "seed", "versions", "min_accuracy_after_warmup", "tail_mean_accuracy",
        "tail_min_accuracy", "tail_mean_auc", "selected_test_accuracy", "final_accuracy",
    )  # fmt: skip
    return {key: result[key] for key in keys}


if __name__ == "__main__":
    sys.exit(main())
