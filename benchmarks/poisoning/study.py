"""Poisoning study on real processes: does the shipped configuration hold against 2 of 8 sites?

Each column is a whole federation as `fedmq demo` starts it (aggregator, evaluator and 8
trainers as processes on the real broker, PneumoniaMNIST with Dirichlet 0.5 label skew),
with the aggregator's shipped defaults unless `--aggregator-flag` says otherwise. In the
attack columns the last two sites run `benchmarks.poisoning.hostile_trainer`:

- `clean`: every site honest;
- `sign-flip`: sites 6 and 7 send their delta x(-1);
- `x-4`: sites 6 and 7 send their delta x(-4);
- `inflated`: sites 6 and 7 flip the sign and claim 10^18 examples (join and updates).

Per column, from the evaluator's log (test split) and the aggregator's `update.rejected`
events: the test AUC of the version selected on val, the mean test AUC over the last 30 s,
the final one, and the refusals by reason. The target: every attack column's AUC within
0.03 of the clean column's.

    uv run python -m benchmarks.poisoning.study --duration 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import EventTap, machine, unique_task_id
from services.demo.federation import Federation, FederationPlan
from services.report.logs import load_run
from services.report.manifest import RunManifest, write_manifest
from services.report.summary import summarize

REPO_ROOT = Path(__file__).resolve().parents[2]
SITES = 8
HOSTILE_SITES = (6, 7)
"""The last two sites (338 and 1161 examples under seed 0's partition: 32% of the data)."""
INFLATED_EXAMPLES = 10**18
TOLERANCE = 0.03
"""An attack column passes when its AUC is at most this far below the clean column's."""


@dataclass(frozen=True)
class Column:
    """One column of the table: what the hostile sites do (no flags: they are honest)."""

    name: str
    hostile_flags: tuple[str, ...] = ()


COLUMNS = {
    "clean": Column("clean"),
    "sign-flip": Column("sign-flip", ("--scale", "-1")),
    "x-4": Column("x-4", ("--scale", "-4")),
    "inflated": Column("inflated", ("--scale", "-1", "--claim-examples", str(INFLATED_EXAMPLES))),
}


class PoisonedFederation(Federation):
    """A federation whose `hostile` sites run the hostile trainer with `flags`."""

    def __init__(self, plan: FederationPlan, *, hostile: Sequence[int], flags: Sequence[str]):
        super().__init__(plan)
        self._hostile = set(hostile) if flags else set()
        self._flags = list(flags)

    def add_trainer(self, index: int) -> None:
        """Start site `index`: the real trainer, or the hostile one for a hostile site."""
        if index not in self._hostile:
            super().add_trainer(index)
            return
        name = self.plan.trainer_id(index)
        env = self.trainer_env(index)
        self._spawn(name, self._flags, env, module="benchmarks.poisoning.hostile_trainer")


def run_column(
    column: Column,
    *,
    seed: int,
    duration: float,
    data_dir: Path | None,
    runs_dir: Path,
    aggregator_flags: Sequence[str],
) -> dict[str, Any]:
    """Run one federation for `duration` seconds; its numbers as a dict."""
    task_id = unique_task_id(f"poison-{column.name}-{seed}")
    run_dir = runs_dir / task_id
    plan = FederationPlan(
        task_id=task_id, run_dir=run_dir, trainers=SITES, strategy="fedbuff",
        partition="dirichlet", dirichlet_alpha=0.5, data_dir=data_dir, seed=seed,
        aggregator_flags=tuple(aggregator_flags),
    )  # fmt: skip
    write_manifest(
        run_dir,
        RunManifest(
            name=column.name, kind="federated", strategy="fedbuff", model="cnn-small",
            started_at=time.time(),
            config={"trainers": SITES, "hostile": list(HOSTILE_SITES),
                    "hostile_flags": list(column.hostile_flags), "seed": seed},
        ),
    )  # fmt: skip
    federation = PoisonedFederation(plan, hostile=HOSTILE_SITES, flags=column.hostile_flags)
    with EventTap(task_id) as tap:
        federation.start()
        try:
            time.sleep(duration)
        finally:
            codes = federation.stop()
        rejected = list(tap.rejected)
    return _measure(column, run_dir, codes, rejected)


def _measure(
    column: Column, run_dir: Path, codes: dict[str, int], rejected: Sequence[Any]
) -> dict[str, Any]:
    run = load_run(run_dir)
    summary = summarize(run)
    by_reason = Counter(r.reason for r in rejected)
    hostile = {f"site-{i}" for i in HOSTILE_SITES}
    return {
        "column": column.name,
        "hostile_flags": list(column.hostile_flags),
        "run_dir": str(run_dir),
        "versions": run.points[-1].version,
        "updates_applied": run.points[-1].updates,
        "evaluations": summary.evaluations,
        "selected_test_auc": summary.selected_auc,
        "selected_test_accuracy": summary.selected_accuracy,
        "tail_mean_auc": summary.tail_mean_auc,
        "tail_min_auc": summary.tail_min_auc,
        "tail_mean_accuracy": summary.tail_mean_accuracy,
        "final_auc": summary.final_auc,
        "rejections": dict(by_reason),
        "rejections_of_hostile_sites": sum(r.trainer_id in hostile for r in rejected),
        "rejections_of_honest_sites": sum(
            r.trainer_id is not None and r.trainer_id not in hostile for r in rejected
        ),
        "exit_codes": codes,
    }


def _verdict(columns: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    clean = next((c[key] for c in columns if c["column"] == "clean"), None)
    gaps = {
        c["column"]: None if clean is None or c[key] is None else round(clean - c[key], 4)
        for c in columns
        if c["column"] != "clean"
    }
    met = clean is not None and all(g is not None and g <= TOLERANCE for g in gaps.values())
    return {"metric": key, "clean": clean, "gap_below_clean": gaps, "met": met}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--data-dir", type=Path, help="holds pneumoniamnist.npz (default: the bundled copy)"
    )
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=200.0, help="seconds per column")
    parser.add_argument(
        "--aggregator-flag", action="append", default=[], dest="aggregator_flags",
        help="extra `fedmq aggregator` flag (repeat); none: the shipped defaults",
    )  # fmt: skip
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs" / "poisoning")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    started = machine()
    columns = []
    for name in args.columns.split(","):
        result = run_column(
            COLUMNS[name], seed=args.seed, duration=args.duration, data_dir=args.data_dir,
            runs_dir=args.runs_dir, aggregator_flags=args.aggregator_flags,
        )  # fmt: skip
        columns.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    document = {
        "benchmark": "poisoning",
        "command": "uv run python -m benchmarks.poisoning.study " + " ".join(sys.argv[1:]),
        "sites": SITES,
        "hostile_sites": list(HOSTILE_SITES),
        "duration_s": args.duration,
        "aggregator_flags": args.aggregator_flags,
        "columns": columns,
        "verdict": [_verdict(columns, k) for k in ("selected_test_auc", "tail_mean_auc")],
        "machine_at_start": started,
        "machine_at_end": machine(),
    }
    text = json.dumps(document, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
