"""`fedmq aggregator`: serve one task from a task file or from flags."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel

from schemas import TaskSpec
from services.aggregator.recipe import STABLE_FEDBUFF, STABLE_SPEC, stable_spec, stable_strategy
from services.aggregator.settings import AggregatorSettings
from services.aggregator.strategies.factory import StrategyConfig
from services.aggregator.task import TaskDefinition, load_task, with_consistent_spec
from services.common.cli_flags import SettingFlag, add_field_flag, add_setting_flags, given_settings
from services.common.errors import UsageError
from services.common.model_names import MODEL_NAMES

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


# One sentence per task flag; choices and defaults come from `TaskSpec` and `StrategyConfig`.
_TASK_HELP: dict[str, str] = {
    "model": "model from the zoo that every site trains",
    "num_classes": "number of classes the model predicts",
    "in_channels": "input channels (1 grey, 3 colour)",
    "image_size": "input side in pixels",
    "dataset": "data set the sites train on, medmnist:<name> or folder:<path>",
    "local_epochs": "passes over its data a site makes per local round",
    "local_steps": "stop a local round after this many batches, even inside an epoch",
    "batch_size": "local batch size",
    "learning_rate": "local learning rate",
    "optimizer": "local optimizer",
    "momentum": "momentum of the local SGD optimizer",
    "logit_adjustment": "tau of the logit-adjusted loss (0: plain cross-entropy)",
    "precision": "precision of the deltas on the wire",
    "max_update_norm": "reject updates whose L2 norm exceeds this",
    "seed": "seed of the initial model (and of the strategy's randomness)",
    "name": "aggregation strategy: fedasync applies each update, fedbuff every buffer-size "
    "updates, fedavg in synchronous rounds",
    "alpha": "fedasync: mixing weight of each update",
    "staleness": "how stale updates are down-weighted",
    "staleness_a": "exponent (polynomial) or slope (hinge) of the staleness weighting",
    "staleness_b": "hinge: staleness below which updates keep full weight",
    "buffer_size": "fedbuff: updates per new model version",
    "server_optimizer": "server-side optimizer applied to the aggregated delta",
    "server_lr": "server learning rate",
    "aggregator": "robust aggregation of a buffer: mean, coordinate-wise median or trimmed mean",
    "trim_fraction": "trimmed_mean: fraction cut from each end per coordinate",
    "clip_norm": "clip each update's L2 norm to this before aggregation",
    "max_staleness": "reject updates staler than this many versions",
    "clients_per_round": "fedavg: sites sampled per round",
    "min_updates": "fedavg: updates that close a round",
    "round_timeout": "fedavg: seconds before a round closes with what arrived",
    "dp_noise_multiplier": "central DP: Gaussian noise as a multiple of dp-clip-norm",
    "dp_clip_norm": "central DP: per-update L2 clip",
}

# Settings flags whose name differs from their field, or that keep their own sentence;
# every other `AggregatorSettings` field gets a flag named after it.
_SETTINGS_FLAGS: tuple[SettingFlag, ...] = (
    ("--replay-window", "replay_window_s", float, ""),
    ("--require-user-id-match", "require_user_id_match", bool, ""),
)


def register(subcommands: Any) -> None:
    """Add `fedmq aggregator` to the CLI."""
    parser = subcommands.add_parser(
        "aggregator",
        help="run the aggregator of one task",
        description="Consume updates, apply the strategy, checkpoint, publish models. "
        "The task comes from --task-file, or else from the task flags below (defaults shown).",
    )
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
        help="weigh buffered updates by site size (FedAvg's rule for whole local epochs), "
        "each capped at what the site declared when it joined",
    )
    add_setting_flags(parser, _SETTINGS_FLAGS, model=AggregatorSettings)
    task = parser.add_argument_group("task (without --task-file)")
    for flag, field, kind in _SPEC_FLAGS:
        _add_task_flag(task, flag, field, kind, TaskSpec)
    for flag, field, kind in _STRATEGY_FLAGS:
        _add_task_flag(task, flag, field, kind, StrategyConfig)
    parser.set_defaults(func=run)


def _add_task_flag(group: Any, flag: str, field: str, kind: type, model: type[BaseModel]) -> None:
    choices = MODEL_NAMES if field == "model" and model is TaskSpec else None
    info = model.model_fields.get(field)
    dest = flag.lstrip("-").replace("-", "_")
    text = _TASK_HELP.get(field, "")
    recipe = STABLE_SPEC if model is TaskSpec else STABLE_FEDBUFF
    default = f"{recipe[field]} (stable recipe)" if field in recipe else None
    add_field_flag(group, flag, field, kind, text, info, choices, dest=dest, default=default)


def settings_from_args(args: argparse.Namespace) -> AggregatorSettings:
    """Environment settings with the flags that were given laid on top."""
    return AggregatorSettings(**given_settings(args, _SETTINGS_FLAGS))


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
    from services.common.metrics import process_registry, serve_metrics
    from services.common.signals import on_termination

    settings = settings_from_args(args)
    configure_logging(level=settings.log_level, json=settings.log_json)
    task = task_from_args(args, settings)
    store = CheckpointStore(settings.checkpoint_dir / task.task_id)
    try:
        core = load_core(task, store)
    except CheckpointFormatError as error:
        raise UsageError(
            f"cannot resume from {store.directory}: {error}",
            hint="point --checkpoint-dir elsewhere or move the old checkpoints away",
        ) from error
    core.accountant = privacy_accountant(
        core.strategy, delta=settings.dp_delta, budget=settings.dp_epsilon_budget
    )
    if settings.dp_epsilon_budget is not None and core.accountant is None:
        raise UsageError("an epsilon budget needs central DP (--dp-noise-multiplier)")
    metrics = AggregatorMetrics(process_registry(), task_id=task.task_id)
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
