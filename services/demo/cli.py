"""`fedmq demo` (a whole federation on one machine, with a live view) and `fedmq watch`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from services.common.model_names import MODEL_NAMES

DEFAULT_DURATION_S = 180.0
"""The demo's training budget: with start-up and shutdown it stays under five minutes."""
REFRESH_S = 1.0


def register(subcommands: Any) -> None:
    """Add `fedmq demo` and `fedmq watch` to the CLI."""
    demo = subcommands.add_parser(
        "demo",
        help="run a federation of hospitals on PneumoniaMNIST, with a live view",
        description="Start an aggregator, an evaluator and N trainers as real processes on a "
        "partition of PneumoniaMNIST, show progress live, then a summary and a report.",
    )
    demo.add_argument("--trainers", type=int, default=4, help="number of sites (default 4)")
    demo.add_argument(
        "--partition",
        choices=("iid", "dirichlet"),
        default="dirichlet",
        help="how the data is split among the sites (default: dirichlet)",
    )
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (label skew)")
    demo.add_argument(
        "--model", default="cnn-small", choices=MODEL_NAMES, help="zoo model (default: cnn-small)"
    )
    demo.add_argument(
        "--strategy",
        choices=("fedbuff", "fedasync", "fedavg"),
        default="fedbuff",
        help="aggregation strategy (default: fedbuff)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_S,
        help=f"seconds of training (default {DEFAULT_DURATION_S:.0f})",
    )
    demo.add_argument("--stragglers", type=int, default=0, help="how many sites are slow")
    demo.add_argument(
        "--straggler-slowdown",
        type=float,
        default=5.0,
        help="how many times slower a straggler trains (default 5)",
    )
    demo.add_argument("--data-dir", type=Path, help="directory holding pneumoniamnist.npz")
    demo.add_argument("--run-dir", type=Path, help="default: runs/demo-<time>")
    demo.add_argument("--seed", type=int, default=0, help="seed of the partition and models")
    demo.add_argument("--no-live", action="store_true", help="print lines instead of a live view")
    demo.add_argument(
        "--aggregator-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra `fedmq aggregator` flag, e.g. --aggregator-flag=--buffer-size=3",
    )
    demo.set_defaults(func=run_demo)

    watch = subcommands.add_parser(
        "watch",
        help="show a running task's progress live",
        description="Attach to a running task: show its current model version, the trainers "
        "seen, updates applied and rejected and the latest evaluation, refreshed every second. "
        "Ctrl-C detaches; the federation keeps running.",
    )
    watch.add_argument("--task-id", help="task to watch (default: env FEDMQ_TASK_ID)")
    watch.add_argument("--duration", type=float, default=None, help="stop after seconds")
    watch.set_defaults(func=run_watch)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo federation; Ctrl-C stops every process it started, cleanly."""
    from rich.console import Console

    from services.common.settings import ServiceSettings
    from services.demo.runner import DemoOptions, run_federation

    console = Console()
    settings = ServiceSettings()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    options = DemoOptions(
        task_id=f"demo-{stamp}",
        run_dir=args.run_dir or Path("runs") / f"demo-{stamp}",
        trainers=args.trainers,
        partition=args.partition,
        dirichlet_alpha=args.alpha,
        model=args.model,
        strategy=args.strategy,
        duration=args.duration,
        stragglers=args.stragglers,
        straggler_slowdown=args.straggler_slowdown,
        data_dir=args.data_dir,
        seed=args.seed,
        live=not args.no_live,
        aggregator_flags=tuple(args.aggregator_flag),
    )
    return run_federation(options, settings=settings, console=console)


def run_watch(args: argparse.Namespace) -> int:
    """Follow a running task's events until Ctrl-C (or `--duration`)."""
    from rich.console import Console
    from rich.live import Live

    from services.common.connect import bus_from_settings
    from services.common.settings import ServiceSettings
    from services.demo.status import FederationStatus
    from services.demo.watcher import EventWatcher

    settings = ServiceSettings()
    console = Console()
    bus = bus_from_settings(settings)
    status = FederationStatus(task_id=args.task_id or settings.task_id)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    with bus:
        watcher = EventWatcher(bus, status)
        try:
            with Live(status.table(), console=console, refresh_per_second=2) as live:
                while deadline is None or time.monotonic() < deadline:
                    watcher.poll()
                    live.update(status.table())
                    time.sleep(REFRESH_S)
        except KeyboardInterrupt:
            pass
        finally:
            watcher.close()
    return 0
