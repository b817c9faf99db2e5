"""`fedmq aggregator`: serve one task from a task file or from flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.aggregator.recipe import stable_spec, stable_strategy
from services.aggregator.settings import AggregatorSettings
from services.aggregator.task import TaskDefinition, load_task, with_consistent_spec

# Flags that define a task when no task file is given: (flag, spec or strategy field, type).
_SPEC_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--model", "model", str),
    ("--num-classes", "num_classes", int),
    ("--in-channels", "in_channels", int),
    ("--image-size", "image_size", int),
    ("--dataset", "dataset", str),
    ("--local-epochs", "local_epochs", int),
    ("--local-steps", "local_steps", int),
    ("--batch-size", "batch_size", int),
    ("--lr", "learning_rate", float),
    ("--optimizer", "optimizer", str),
    ("--momentum", "momentum", float),
    ("--logit-adjustment", "logit_adjustment", float),
    ("--precision", "precision", str),
    ("--max-update-norm", "max_update_norm", float),
    ("--seed", "seed", int),
)
_STRATEGY_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--strategy", "name", str),
    ("--alpha", "alpha", float),
    ("--staleness", "staleness", str),
    ("--staleness-a", "staleness_a", float),
    ("--staleness-b", "staleness_b", int),
    ("--buffer-size", "buffer_size", int),
    ("--server-optimizer", "server_optimizer", str),
    ("--server-lr", "server_lr", float),
    ("--aggregator", "aggregator", str),
    ("--trim-fraction", "trim_fraction", float),
    ("--clip-norm", "clip_norm", float),
    ("--max-staleness", "max_staleness", int),
    ("--clients-per-round", "clients_per_round", int),
    ("--min-updates", "min_updates", int),
    ("--round-timeout", "round_timeout", float),
    ("--dp-noise-multiplier", "dp_noise_multiplier", float),
    ("--dp-clip-norm", "dp_clip_norm", float),
)


def register(subcommands: Any) -> None:
    """Add `fedmq aggregator` to the CLI."""
    parser = subcommands.add_parser(
        "aggregator",
        help="run the aggregator of one task",
        description="Consume updates, apply the strategy, checkpoint, publish models.",
    )
    parser.add_argument("--task-file", type=Path, help="YAML/JSON task definition")
    parser.add_argument("--task-id", help="task id (default: FEDMQ_TASK_ID or 'pneumonia')")
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--fedbn", action="store_true", help="keep BatchNorm local to sites")
    parser.add_argument(
        "--uniform-weights",
        action="store_true",
        help="weigh buffered updates alike, not by site size (sites that train the same "
        "number of local steps do the same work; FedBuff's default)",
    )
    parser.add_argument(
        "--sample-weighted",
        action="store_true",
        help="weigh buffered updates by site size (FedAvg's rule for whole local epochs)",
    )
    parser.add_argument("--trainer-keys", type=Path, help="trainers' public keys (file or dir)")
    parser.add_argument(
        "--require-user-id-match",
        action="store_true",
        default=None,
        help="each trainer has its own broker login, equal to its trainer id",
    )
    parser.add_argument("--replay-window", type=float, help="seconds (default 600)")
    parser.add_argument("--dp-delta", type=float, help="delta of the reported epsilon")
    parser.add_argument("--dp-epsilon-budget", type=float, help="stop before exceeding it")
    for flag, _field, kind in _SPEC_FLAGS + _STRATEGY_FLAGS:
        parser.add_argument(flag, type=kind)
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> AggregatorSettings:
    """Environment settings with the flags that were given laid on top."""
    overrides = {
        "task_file": args.task_file,
        "task_id": args.task_id,
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_every": args.checkpoint_every,
        "metrics_port": args.metrics_port,
        "trainer_keys": args.trainer_keys,
        "require_user_id_match": args.require_user_id_match,
        "replay_window_s": args.replay_window,
        "dp_delta": args.dp_delta,
        "dp_epsilon_budget": args.dp_epsilon_budget,
    }
    return AggregatorSettings(**{k: v for k, v in overrides.items() if v is not None})


def task_from_args(args: argparse.Namespace, settings: AggregatorSettings) -> TaskDefinition:
    """The task file when given, else a task built from the flags over the stable recipe
    (`services.aggregator.recipe`: cnn-small, FedBuff K=4, uniform weights, server lr 0.5,
    16 local steps at lr 0.003)."""
    if settings.task_file is not None:
        return _with_signatures(with_consistent_spec(load_task(settings.task_file)), settings)
    spec: dict[str, Any] = {"task_id": settings.task_id, "model": "cnn-small", "num_classes": 2}
    spec.update(stable_spec(_given(args, _SPEC_FLAGS)))
    if args.fedbn:
        spec["fedbn"] = True
    given = _given(args, _STRATEGY_FLAGS)
    if args.uniform_weights:
        given["sample_weighted"] = False
    if args.sample_weighted:
        given["sample_weighted"] = True
    strategy = stable_strategy(given)
    definition = {"spec": spec, "strategy": strategy}
    return _with_signatures(
        with_consistent_spec(TaskDefinition.model_validate(definition)), settings
    )


def _with_signatures(task: TaskDefinition, settings: AggregatorSettings) -> TaskDefinition:
    """With trainer keys, every update must be signed: say so in the spec trainers receive."""
    if settings.trainer_keys is None or task.spec.signatures_required:
        return task
    spec = task.spec.model_copy(update={"signatures_required": True})
    return task.model_copy(update={"spec": spec})


def _given(args: argparse.Namespace, flags: tuple[tuple[str, str, type], ...]) -> dict[str, Any]:
    values = {}
    for flag, field, _kind in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            values[field] = value
    return values


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; the last checkpoint is written on the way out."""
    from services.aggregator.accounting import privacy_accountant
    from services.aggregator.bootstrap import load_core
    from services.aggregator.checkpoint import CheckpointFormatError, CheckpointStore
    from services.aggregator.metrics import AggregatorMetrics
    from services.aggregator.service import AggregatorService
    from services.common.connect import bus_from_settings
    from services.common.logging import configure_logging
    from services.common.metrics import serve_metrics
    from services.common.signals import on_termination

    settings = settings_from_args(args)
    configure_logging(level=settings.log_level, json=settings.log_json)
    task = task_from_args(args, settings)
    store = CheckpointStore(settings.checkpoint_dir / task.task_id)
    try:
        core = load_core(task, store)
    except CheckpointFormatError as error:
        print(f"cannot resume: {error}", file=sys.stderr)
        return 2
    core.accountant = privacy_accountant(
        core.strategy, delta=settings.dp_delta, budget=settings.dp_epsilon_budget
    )
    if settings.dp_epsilon_budget is not None and core.accountant is None:
        print("an epsilon budget needs central DP (--dp-noise-multiplier)", file=sys.stderr)
        return 2
    metrics = AggregatorMetrics()
    serve_metrics(metrics.registry, settings.metrics_port)
    bus = bus_from_settings(settings)
    service = AggregatorService(
        bus=bus, task=task, core=core, store=store, settings=settings, metrics=metrics
    )
    on_termination(service.stop)
    try:
        service.run()
    finally:
        bus.close()
    return 0
