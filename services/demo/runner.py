"""The demo's flow: check the broker and the data, start the federation, watch, stop, report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.common.errors import ChildDied
from services.common.settings import ServiceSettings
from services.demo.federation import Federation, FederationPlan
from services.demo.status import FederationStatus
from services.report.summary import TAIL_WINDOW_S, RunSummary

if TYPE_CHECKING:
    from services.report.writer import Report

REFRESH_S = 1.0


@dataclass(frozen=True)
class DemoOptions:
    """What `fedmq demo` was asked to run."""

    task_id: str
    run_dir: Path
    trainers: int
    partition: str
    dirichlet_alpha: float
    model: str
    strategy: str
    duration: float
    stragglers: int
    straggler_slowdown: float
    data_dir: Path | None
    seed: int
    live: bool
    aggregator_flags: tuple[str, ...] = ()


def run_federation(options: DemoOptions, *, settings: ServiceSettings, console: Console) -> int:
    """Run one demo federation to its time budget; return the process exit code."""
    from services.common.connect import bus_from_settings
    from services.common.data.medmnist import ensure_medmnist_file

    # Data first: it needs no broker, and a missing file is the likelier first-run problem.
    data_file = ensure_medmnist_file("pneumoniamnist", data_dir=options.data_dir)
    with bus_from_settings(settings) as bus:
        return _run(options, bus, console, data_file)


def _run(options: DemoOptions, bus: object, console: Console, data_file: Path) -> int:
    from services.common.bus import Bus
    from services.demo.watcher import EventWatcher
    from services.report.manifest import RunManifest, write_manifest

    assert isinstance(bus, Bus)
    plan = FederationPlan(
        task_id=options.task_id,
        run_dir=options.run_dir,
        trainers=options.trainers,
        model=options.model,
        strategy=options.strategy,
        partition=options.partition,
        dirichlet_alpha=options.dirichlet_alpha,
        stragglers=options.stragglers,
        straggler_slowdown=options.straggler_slowdown,
        data_dir=data_file.parent,
        seed=options.seed,
        aggregator_flags=options.aggregator_flags,
    )
    status = FederationStatus(task_id=options.task_id)
    watcher = EventWatcher(bus, status)
    federation = Federation(plan)
    write_manifest(
        options.run_dir,
        RunManifest(
            name=f"{options.strategy} ({options.trainers} sites)",
            kind="federated",
            strategy=options.strategy,
            model=options.model,
            started_at=status.started_at,
            config={
                "trainers": options.trainers,
                "partition": options.partition,
                "dirichlet_alpha": options.dirichlet_alpha,
                "stragglers": options.stragglers,
                "duration": options.duration,
                "task_id": options.task_id,
            },
        ),
    )
    console.print(
        f"fedmq demo: {options.trainers} hospitals, {options.partition} partition, "
        f"{options.model}, {options.strategy}, {options.duration:.0f} s. Ctrl-C stops it."
    )
    federation.start()
    interrupted = False
    death: tuple[str, int, str] | None = None
    try:
        death = _watch(watcher, status, options, console, federation)
    except KeyboardInterrupt:
        interrupted = True
        console.print("stopping every process ...")
    finally:
        codes = federation.stop()
        time.sleep(0.5)
        watcher.poll()
        watcher.close()
        _remove_task_queues(bus, plan)
    if death is not None:
        console.print(_summary(status, codes, None))
        raise _child_died(death, options.run_dir)
    report = _write_report(options.run_dir, console)
    console.print(_summary(status, codes, None if report is None else report.summaries[0]))
    report_dir = None if report is None else report.markdown_path.parent
    console.print(f"run directory: {options.run_dir}  report: {report_dir}")
    if interrupted:
        return 130
    return 0 if all(code == 0 for code in codes.values()) else 1


def _remove_task_queues(bus: object, plan: FederationPlan) -> None:
    """The demo's task is over: delete its queues (never the shared dead-letter queue)."""
    from services.common.bus import Bus
    from services.common.topology import (
        DEAD_QUEUE,
        events_queue,
        follower_queue_name,
        task_topology,
    )

    assert isinstance(bus, Bus)
    task = plan.task_id
    followers = ["evaluator", *(plan.trainer_id(i) for i in range(plan.trainers))]
    names = [q.name for q in task_topology(task).queues if q.name != DEAD_QUEUE]
    names += [follower_queue_name(task, follower) for follower in followers]
    names.append(events_queue("aggregator", task).name)
    for name in names:
        bus.delete_queue(name)


def _child_died(death: tuple[str, int, str], run_dir: Path) -> ChildDied:
    name, code, last_line = death
    why = f": {last_line}" if last_line else ""
    return ChildDied(
        f"the {name} process exited with code {code}{why}",
        hint=f"the demo stopped the others; its log is {run_dir / 'logs' / f'{name}.log'}",
    )


def _watch(
    watcher: object,
    status: FederationStatus,
    options: DemoOptions,
    console: Console,
    federation: Federation,
) -> tuple[str, int, str] | None:
    """Show progress until the time budget is spent or a process dies (returned)."""
    from services.demo.watcher import EventWatcher

    assert isinstance(watcher, EventWatcher)
    deadline = time.monotonic() + options.duration
    if not options.live:
        while time.monotonic() < deadline:
            death = federation.first_death()
            if death is not None:
                return death
            watcher.poll()
            latest = status.latest_eval
            accuracy = "-" if latest is None else f"{latest.accuracy:.3f}"
            console.print(
                f"version {status.version} applied {status.updates_applied} "
                f"rejected {status.updates_rejected} trainers {status.active_trainers} "
                f"accuracy {accuracy}"
            )
            _sleep_unless_death(federation, 5 * REFRESH_S)
        return None
    with Live(status.table(), console=console, refresh_per_second=2) as live:
        while time.monotonic() < deadline:
            death = federation.first_death()
            if death is not None:
                return death
            watcher.poll()
            live.update(status.table())
            time.sleep(REFRESH_S)
    return None


def _sleep_unless_death(federation: Federation, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and federation.first_death() is None:
        time.sleep(REFRESH_S / 5)


def _summary(status: FederationStatus, codes: dict[str, int], summary: RunSummary | None) -> Table:
    """The status table, then the honest numbers first: the version selected on `val`
    (scored on test), the final version, the last 30 s; best-on-test last, as a bound."""
    table = status.table()
    table.title = f"fedmq demo summary ({status.task_id})"
    if summary is not None:
        for name, value in summary_rows(summary):
            table.add_row(name, value)
    table.add_row("evaluations", str(len(status.test_evaluations)))
    clean = all(code == 0 for code in codes.values())
    table.add_row("processes", "all stopped cleanly" if clean else f"exit codes {codes}")
    return table


def summary_rows(summary: RunSummary) -> list[tuple[str, str]]:
    """`(what, value)` rows of a run's honest numbers, for the demo's summary table."""
    selected = (
        "n/a (no val evaluation)"
        if summary.selected_version is None
        else f"{_pair(summary.selected_accuracy, summary.selected_auc)}"
        f" (version {summary.selected_version}, val balanced acc"
        f" {_number(summary.selected_val_score)})"
    )
    return [
        ("test acc / AUC, version selected on val", selected),
        ("test acc / AUC, final version", _pair(summary.final_accuracy, summary.final_auc)),
        (
            f"test acc, last {TAIL_WINDOW_S:.0f} s: mean / min",
            f"{_number(summary.tail_mean_accuracy)} / {_number(summary.tail_min_accuracy)}",
        ),
        ("majority-class rate (test)", _number(summary.majority_rate)),
        ("best test acc (optimistic bound)", _number(summary.best_accuracy)),
    ]


def _pair(accuracy: float | None, auc: float | None) -> str:
    return f"{_number(accuracy)} / {_number(auc)}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _write_report(run_dir: Path, console: Console) -> Report | None:
    from services.report.errors import RunLogError
    from services.report.writer import write_report

    try:
        return write_report([run_dir], run_dir / "report", targets=(0.8, 0.85))
    except RunLogError as error:
        console.print(f"[yellow]no report:[/] {error}")
        return None
