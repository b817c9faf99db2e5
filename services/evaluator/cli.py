"""`fedmq evaluator`: follow a task's models and evaluate them; flags override `FEDMQ_*`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.common.cli_flags import COMMON_FLAGS, SettingFlag, add_setting_flags, given_settings
from services.evaluator.settings import EvaluatorSettings

_FLAGS: tuple[SettingFlag, ...] = (
    *COMMON_FLAGS,
    ("--task-id", "task_id", str, "task to follow"),
    ("--evaluator-id", "evaluator_id", str, "names the follower queue"),
    ("--split", "split", str, "split scored and selected by"),
    ("--test-split", "test_split", str, "also scored, never selects; none: skip"),
    ("--test-every", "test_every", int, "score the test split every n-th evaluation"),
    ("--checkpoint-dir", "checkpoint_dir", Path, "keep the best on val in <dir>/<task>/best/"),
    ("--served-average", "served_average", float, "score an EMA of versions, this decay"),
    ("--every-n-versions", "every_n_versions", int, "evaluate every n-th version"),
    ("--min-interval", "min_interval", float, "at most one evaluation per this many seconds"),
    ("--log-path", "log_path", Path, "JSONL log"),
    ("--batch-size", "batch_size", int, "evaluation batch size"),
)
_CHOICES: dict[str, tuple[str, ...]] = {
    "split": ("train", "val", "test"),
    "test_split": ("train", "val", "test", "none"),
}


def register(subcommands: Any) -> None:
    """Add `fedmq evaluator` to the CLI."""
    parser = subcommands.add_parser(
        "evaluator",
        help="evaluate each published model on held-out data",
        description=(
            "Follow a task's published models, evaluate the due ones on a held-out split, "
            "publish EvalReport events and append them to a JSONL log (resumed on restart)."
        ),
    )
    add_setting_flags(parser, _FLAGS, choices=_CHOICES, model=EvaluatorSettings)
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> EvaluatorSettings:
    """Environment settings with the flags that were given laid on top."""
    return EvaluatorSettings(**given_settings(args, _FLAGS))


def run(args: argparse.Namespace) -> int:
    """Run the evaluator until SIGTERM/SIGINT (the evaluation in progress is finished)."""
    from services.common.connect import bus_from_settings
    from services.common.logging import configure_logging
    from services.common.metrics import readings_registry, serve_metrics
    from services.common.signals import on_termination
    from services.evaluator.service import EvaluatorService
    from services.trainer.local_round import set_torch_threads

    settings = settings_from_args(args)
    configure_logging(level=settings.log_level, json=settings.log_json)
    set_torch_threads(settings.torch_threads)
    bus = bus_from_settings(settings)
    service = EvaluatorService(settings, bus=bus)

    def last(metric: str) -> float:
        report = service.last_report
        value = None if report is None else getattr(report, metric)
        return float("nan") if value is None else float(value)

    counters = {
        "fedmq_eval_reports": ("Evaluation reports written", lambda: service.reports_written)
    }
    gauges = {
        "fedmq_eval_accuracy": (
            "Accuracy of the newest evaluated version",
            lambda: last("accuracy"),
        ),
        "fedmq_eval_auc": ("ROC AUC of the newest evaluated version", lambda: last("auc")),
        "fedmq_eval_version": ("Newest evaluated model version", lambda: last("version")),
    }
    registry = readings_registry(settings.task_id, counters=counters, gauges=gauges)
    serve_metrics(registry, settings.metrics_port)
    on_termination(service.stop)
    try:
        return service.run()
    finally:
        bus.close()
