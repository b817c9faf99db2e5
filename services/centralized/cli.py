"""`fedmq centralized`: the federated task's model trained on the pooled data, for comparison."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from services.centralized.trainer import CentralizedConfig, CentralizedResult, EvalEvent

# Defaults of a federated task (`TaskSpec`), so that an unflagged baseline matches one.
DEFAULT_MODEL = "cnn-small"
DEFAULT_DATA_SOURCE = "medmnist:pneumoniamnist"
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 0.01
DEFAULT_MOMENTUM = 0.9
DEFAULT_EPOCHS = 5


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add the `centralized` sub-command."""
    parser = subcommands.add_parser(
        "centralized",
        help="train the task's model on the pooled train split (the baseline)",
        description=(
            "Train one model on the whole train split in this process, evaluate it on the "
            "test split after every epoch (or every N seconds) and at the end, and write "
            "RUN_DIR/eval.jsonl and RUN_DIR/run.json for `fedmq report`."
        ),
    )
    _add_data_arguments(parser)
    _add_training_arguments(parser)
    parser.add_argument("--run-dir", type=Path, required=True, help="where the logs go")
    parser.add_argument("--name", help="label in reports (default: the run directory's name)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the logs of a run already in RUN_DIR"
    )
    parser.add_argument("--torch-threads", type=_positive_int, help="torch intra-op threads")
    parser.set_defaults(func=run_command)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo model (default: %(default)s)")
    parser.add_argument(
        "--data-source",
        default=DEFAULT_DATA_SOURCE,
        help="medmnist:<name> or folder:<path> (default: %(default)s)",
    )
    parser.add_argument("--data-dir", type=Path, help="directory of MedMNIST .npz files")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="input channels")
    parser.add_argument("--image-size", type=_positive_int, help="input side in pixels")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--logit-adjustment", type=float, default=0.0,
        help="tau of the logit-adjusted loss (0: plain cross-entropy)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget-seconds", type=_positive_float, help="stop training after this wall-clock time"
    )
    parser.add_argument(
        "--eval-every-seconds",
        type=_positive_float,
        help="evaluate every N seconds instead of after every epoch",
    )


def run_command(args: argparse.Namespace) -> int:
    """Run the baseline, printing each evaluation and a summary; 1 when training diverged."""
    import torch
    from rich.console import Console

    from services.centralized.trainer import TrainingDiverged, run_centralized
    from services.common.data import DatasetError

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    console = Console()
    try:
        config = config_from_args(args)
        result = run_centralized(config, observer=ConsoleObserver(console))
    except DatasetError:
        raise  # missing data: the command line's boundary reports it with its own exit code
    except (TrainingDiverged, ValueError) as error:
        print(f"fedmq centralized: {error}", file=sys.stderr)
        return 1
    print_summary(console, result, config.run_dir)
    return 0


def config_from_args(args: argparse.Namespace) -> CentralizedConfig:
    """The run configuration the flags describe."""
    from services.centralized.trainer import CentralizedConfig
    from services.common.training import TrainConfig

    train = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed,
        logit_adjustment=args.logit_adjustment,
    )  # fmt: skip
    return CentralizedConfig(
        run_dir=args.run_dir,
        name=args.name or args.run_dir.resolve().name,
        model=args.model,
        data_source=args.data_source,
        data_dir=args.data_dir,
        train=train,
        budget_seconds=args.budget_seconds,
        eval_every_seconds=args.eval_every_seconds,
        channels=args.channels,
        image_size=args.image_size,
        overwrite=args.overwrite,
    )


class ConsoleObserver:
    """Prints one line per evaluation and per epoch."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def on_eval(self, event: EvalEvent) -> None:
        """Print the evaluation's scores and where training stood."""
        report = event.report
        self._console.print(
            f"eval {report.version:>3}  epoch {event.epochs:5.2f}  "
            f"steps {report.updates_applied:>6}  {event.seconds:7.1f} s  "
            f"acc {report.accuracy:.4f}  auc {_score(report.auc)}  loss {report.loss:.4f}",
            highlight=False,
            soft_wrap=True,
        )

    def on_epoch(self, epoch: int, seconds: float) -> None:
        """Print the epoch's training time."""
        self._console.print(
            f"epoch {epoch} trained in {seconds:.1f} s", style="dim", soft_wrap=True
        )


def print_summary(console: Console, result: CentralizedResult, run_dir: Path) -> None:
    """Best and final accuracy and AUC, time per epoch, where the logs are."""
    reports = result.reports
    best = max(reports, key=lambda r: r.accuracy)
    aucs = [r.auc for r in reports if r.auc is not None]
    epochs = result.epoch_seconds
    pace = f"{sum(epochs) / len(epochs):.1f} s/epoch" if epochs else "no full epoch"
    stopped = " (stopped by the time budget)" if result.stopped_by_budget else ""
    lines = [
        f"{result.manifest.name}: {result.steps} steps in {result.seconds:.1f} s{stopped}, {pace}",
        f"best  acc {best.accuracy:.4f} (eval {best.version})  "
        f"best auc {_score(max(aucs) if aucs else None)}",
        f"final acc {reports[-1].accuracy:.4f}  final auc {_score(reports[-1].auc)}",
        f"logs: {run_dir / 'eval.jsonl'} and {run_dir / 'run.json'}",
    ]
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
