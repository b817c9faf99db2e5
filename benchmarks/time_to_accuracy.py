"""Time to accuracy with real processes: asynchronous FedBuff against the FedAvg round barrier.

Each run starts a whole federation as `fedmq demo` does (aggregator, evaluator and one
`fedmq trainer` process per site on the real broker, PneumoniaMNIST split with Dirichlet
label skew from one partition seed, some sites slowed down) twice: once with the shipped
asynchronous defaults, once with synchronous FedAvg whose round waits for every site.
The clock starts at the first trainer's `joined` line. Per run:

- per site: seconds from `joined` to the broker's confirm of its first update, next to the
  training time of that round (the site's own `train_seconds`), and their difference;
- when version 1 was published; versions published and versions the evaluator scored;
- seconds to test accuracy 0.80 / 0.85 / 0.88, from the PUBLICATION time of the first
  evaluated version that reached it (the evaluator scores every version it is offered;
  when it falls behind it skips to the newest, and the count shows how many it scored);
- CPU seconds each process used; the baseline's times and the ratios barrier / async.

    uv run python -m benchmarks.time_to_accuracy --runs 3 --out runs/tta.json
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    EventTap,
    declare_task,
    delete_task_queues,
    emit,
    machine,
    unique_task_id,
)
from benchmarks.timeline import (
    best_accuracy,
    latency_summary,
    median_or_none,
    read_evaluations,
    read_site,
    site_rows,
    time_to_accuracy,
)
from services.common.logging import configure_logging
from services.demo.federation import Federation, FederationPlan

REPO = Path(__file__).resolve().parents[1]
TARGETS = (0.80, 0.85, 0.88)
POLL_S = 0.25
JOIN_TIMEOUT_S = 180.0
"""Processes import torch before they join: slow when many start at once on a busy box."""


@dataclass(frozen=True)
class Scenario:
    """The federation both strategies run on."""

    sites: int = 8
    slow_sites: tuple[int, ...] = (0, 1)
    slowdown: float = 5.0
    alpha: float = 0.5
    model: str = "cnn-small"
    seed: int = 0
    data_dir: Path | None = None


@dataclass(frozen=True)
class Arm:
    """One strategy of the comparison and how long it may run after the first join."""

    name: str
    strategy: str
    flags: tuple[str, ...]
    budget_s: float
    first_updates_only: bool = False
    """Stop once every site has sent its first update (the latency guard needs no more)."""


def run_arm(
    arm: Arm, scenario: Scenario, *, targets: Sequence[float], workdir: Path
) -> dict[str, Any]:
    """Start the federation, run it until the best target is reached or the budget is spent."""
    task_id = unique_task_id(f"tta-{arm.name}")
    plan = FederationPlan(
        task_id=task_id, run_dir=workdir / task_id, trainers=scenario.sites,
        model=scenario.model, strategy=arm.strategy, partition="dirichlet",
        dirichlet_alpha=scenario.alpha, stragglers=len(scenario.slow_sites),
        straggler_slowdown=scenario.slowdown, slow_sites=scenario.slow_sites,
        data_dir=scenario.data_dir, seed=scenario.seed, aggregator_flags=arm.flags,
    )  # fmt: skip
    declare_task(task_id)
    federation = Federation(plan)
    logs = plan.run_dir / "logs"
    names = [plan.trainer_id(i) for i in range(scenario.sites)]
    try:
        with EventTap(task_id) as tap:
            started = time.time()
            federation.start()
            start = _first_join(logs, names, federation)
            done = (
                _all_sent(logs, names)
                if arm.first_updates_only
                else _reached(federation, max(targets))
            )
            _run_until(start + arm.budget_s, done)
            cpu = federation.cpu_seconds()
            published = [(event.published_at, event.version) for _, event in tap.published]
    finally:
        codes = federation.stop()
        delete_task_queues(task_id)
    sites = [read_site(logs / f"{name}.log") for name in names]
    reports = read_evaluations(federation.eval_log)
    slowdowns = {plan.trainer_id(i): plan.slowdown(i) for i in range(scenario.sites)}
    rows = site_rows(sites, start, slowdowns)
    version_1 = next((at for at, version in published if version >= 1), None)
    return {
        "arm": arm.name,
        "strategy": arm.strategy,
        "aggregator_flags": list(arm.flags),
        "task_id": task_id,
        "first_join_after_spawn_s": round(start - started, 3),
        "sites": rows,
        "latency": latency_summary(rows),
        "version_1_s": None if version_1 is None else round(version_1 - start, 3),
        "time_to_accuracy_s": time_to_accuracy(reports, targets, start=start),
        "best_test_accuracy": best_accuracy(reports),
        "versions_published": max((v for _, v in published), default=0),
        "versions_evaluated": len({r["version"] for r in reports if r["version"] > 0}),
        "ran_s": round(time.time() - start, 3),
        "cpu_s": {name: round(seconds, 2) for name, seconds in cpu.items()},
        "exit_codes": codes,
    }


def _first_join(logs: Path, names: Sequence[str], federation: Federation) -> float:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while time.monotonic() < deadline:
        joined = [s.joined_at for s in (read_site(logs / f"{n}.log") for n in names)]
        first = min((at for at in joined if at is not None), default=None)
        if first is not None:
            return first
        if not all(federation.alive().values()):
            raise RuntimeError(f"a process exited before any site joined: see {logs}")
        time.sleep(POLL_S)
    raise TimeoutError(f"no site joined within {JOIN_TIMEOUT_S:.0f}s: see {logs}")


def _run_until(deadline: float, done: Callable[[], bool]) -> None:
    while time.time() < deadline and not done():
        time.sleep(POLL_S)


def _reached(federation: Federation, accuracy: float) -> Callable[[], bool]:
    def done() -> bool:
        best = best_accuracy(read_evaluations(federation.eval_log))
        return best is not None and best >= accuracy

    return done


def _all_sent(logs: Path, names: Sequence[str]) -> Callable[[], bool]:
    return lambda: all(read_site(logs / f"{n}.log").updates_sent > 0 for n in names)


def compare(runs: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """Medians over runs of the async arm's figures, the baseline's, and their ratios."""
    summary: dict[str, Any] = {}
    for arm in ("async", "barrier"):
        arms = [r[arm] for r in runs]
        summary[arm] = {
            "version_1_s": median_or_none(a["version_1_s"] for a in arms),
            "overhead_max_s": median_or_none(a["latency"]["overhead_max_s"] for a in arms),
            "worst_latency_ratio": median_or_none(a["latency"]["worst_ratio"] for a in arms),
            "time_to_accuracy_s": {
                f"{t:g}": median_or_none(a["time_to_accuracy_s"][f"{t:g}"] for a in arms)
                for t in targets
            },
        }
    budget = min(r["barrier"]["ran_s"] for r in runs)
    summary["barrier_over_async"] = {
        key: _ratio(summary["barrier"]["time_to_accuracy_s"][key], value, budget)
        for key, value in summary["async"]["time_to_accuracy_s"].items()
    }
    return summary


def _ratio(slow: float | None, fast: float | None, budget: float) -> dict[str, Any] | None:
    """barrier / async; when the barrier never got there, at least its budget / async."""
    if fast is None or fast <= 0:
        return None
    if slow is None:
        return {"at_least": round(budget / fast, 2)}
    return {"value": round(slow / fast, 2)}


def bytecode_cached() -> bool:
    """Whether torch's modules load from cached bytecode (else every process compiles them:
    seconds of CPU per process start, see docs/operations.md)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    return Path(importlib.util.cache_from_source(spec.origin)).exists()


def _commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=1, help="repetitions (medians over them)")
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--slow-sites", default="0,1", help="indices of the slow sites")
    parser.add_argument("--slowdown", type=float, default=5.0, help="how much slower they are")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--seed", type=int, default=0, help="partition seed")
    parser.add_argument("--data-dir", type=Path, help="holds pneumoniamnist.npz")
    parser.add_argument("--strategy", default="fedbuff", help="the asynchronous arm")
    parser.add_argument(
        "--aggregator-flag", action="append", default=[], dest="flags",
        help="extra `fedmq aggregator` flag of the async arm (repeatable)",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=40.0, help="async seconds after join")
    parser.add_argument("--baseline-budget", type=float, default=90.0)
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the barrier arm (CI guard)"
    )
    parser.add_argument(
        "--first-updates-only", action="store_true",
        help="stop each run once every site has sent one update (the latency figures only)",
    )  # fmt: skip
    parser.add_argument("--runs-dir", type=Path, help="keep every run's logs here (default: none)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    configure_logging(level="WARNING")  # logs to stderr; stdout carries the JSON
    args = parse_args(argv)
    slow = tuple(int(s) for s in args.slow_sites.split(",") if s.strip())
    scenario = Scenario(
        sites=args.sites, slow_sites=slow, slowdown=args.slowdown, alpha=args.alpha,
        model=args.model, seed=args.seed, data_dir=args.data_dir,
    )  # fmt: skip
    every = ("--clients-per-round", str(args.sites), "--min-updates", str(args.sites))
    arms = [Arm("async", args.strategy, tuple(args.flags), args.budget, args.first_updates_only)]
    if not args.no_baseline:
        arms.append(Arm("barrier", "fedavg", every, args.baseline_budget))
    at_start = machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedmq-tta-") as scratch:
        workdir = args.runs_dir or Path(scratch)
        for index in range(args.runs):
            run = {arm.name: run_arm(arm, scenario, targets=TARGETS, workdir=workdir)
                   for arm in arms}  # fmt: skip
            runs.append({"run": index, **run})
            print(f"run {index}: {_brief(run)}", file=sys.stderr, flush=True)
    report: dict[str, Any] = {
        "benchmark": "time_to_accuracy",
        "command": "uv run python -m benchmarks.time_to_accuracy "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": _commit(),
        "bytecode_cached": bytecode_cached(),
        "scenario": {**scenario.__dict__, "data_dir": str(scenario.data_dir or "")},
        "targets": list(TARGETS),
        "runs": runs,
        "machine_at_start": at_start,
        "machine_at_end": machine(),
    }
    if not args.no_baseline:
        report["median"] = compare(runs, TARGETS)
    return emit(report, args.out)


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "v1": arm["version_1_s"],
            "overhead_max": arm["latency"]["overhead_max_s"],
            "tta": arm["time_to_accuracy_s"],
            "versions": f"{arm['versions_evaluated']}/{arm['versions_published']}",
        }
        for name, arm in run.items()
    }


if __name__ == "__main__":
    main()
