"""Settings of the evaluator: which held-out data, how often to evaluate, where the log goes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt

from services.common.settings import ServiceSettings
from services.common.training import EVAL_BATCH_SIZE
from services.trainer.settings import DEFAULT_DATA_SOURCE, DEFAULT_JOIN_TIMEOUT_S

RUNS_DIR = Path("runs")
EVAL_LOG_NAME = "eval.jsonl"


class EvaluatorSettings(ServiceSettings):
    """Everything the evaluator needs besides the task spec it learns by joining."""

    evaluator_id: str = Field(default="evaluator", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """Names its follower queue `fedmq.<task>.follow.<evaluator_id>` and its heartbeats."""
    data_source: str = DEFAULT_DATA_SOURCE
    """`medmnist:<name>` or `folder:<path>` holding the held-out images."""
    data_dir: Path | None = None
    """Directory holding MedMNIST `.npz` files (default: `~/.medmnist`)."""
    split: Literal["train", "val", "test"] = "val"
    """The split every evaluated version is scored on; on `val` it also selects the best one."""
    test_split: Literal["train", "val", "test", "none"] = "test"
    """Scored too and reported separately (never used to select); "none" to skip it."""
    test_every: PositiveInt = 1
    """Score `test_split` on every n-th evaluation only (the selection split on every one)."""
    served_average: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Score (and keep as best) an exponential moving average of the versions, this decay
    per version, instead of each version alone; 0 scores each version itself."""
    checkpoint_dir: Path | None = Path("runs/checkpoints")
    """The aggregator's `--checkpoint-dir`: the best version on `val` is kept in
    `<checkpoint_dir>/<task>/best/` (see `services.aggregator.best`); None keeps none."""
    every_n_versions: PositiveInt = 1
    """Evaluate a version only once it is at least this many versions past the last one."""
    min_interval: float = Field(default=0.0, ge=0.0)
    """At most one evaluation per this many seconds; the newest model waiting is done next."""
    log_path: Path | None = None
    """JSONL file of reports (default: `runs/<task>/eval.jsonl`)."""
    batch_size: PositiveInt = EVAL_BATCH_SIZE
    """Evaluation batch size."""
    torch_threads: PositiveInt = 1
    """Intra-op threads torch may use."""
    join_timeout: float = Field(default=DEFAULT_JOIN_TIMEOUT_S, gt=0.0)
    """How long to keep asking to join (and to wait for a lost broker) before giving up."""

    @property
    def resolved_log_path(self) -> Path:
        """`log_path`, or `runs/<task>/eval.jsonl` when none was given."""
        return self.log_path or RUNS_DIR / self.task_id / EVAL_LOG_NAME
