"""Evaluate global versions on the test split and log them as the evaluator would (eval.jsonl)."""

from __future__ import annotations

import math
from pathlib import Path

from schemas import EvalReport, GlobalModel, TaskSpec
from services.common.data import ImageDataset
from services.common.training import EvalResult, evaluate
from services.report.logs import EVAL_LOG_FILE, append_eval_report
from services.report.manifest import RunManifest, write_manifest
from services.trainer.local_model import LocalModel

DIVERGED_LOSS = 1e9
"""Logged loss of a model whose weights are no longer finite (its accuracy is logged as 0)."""


class EvalRecorder:
    """The study's evaluator: one `EvalReport` line per evaluated version, virtual timestamps.

    `model_published_at` is the virtual time the version was published and the manifest
    starts at 0, so `services.report` reads the run as it reads a real one.
    """

    def __init__(
        self, *, run_dir: Path, manifest: RunManifest, spec: TaskSpec, test: ImageDataset
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self._log = run_dir / EVAL_LOG_FILE
        self._log.unlink(missing_ok=True)
        write_manifest(run_dir, manifest)
        self._local = LocalModel(spec)
        self._test = test
        self.last_version: int | None = None
        self.reports: list[EvalReport] = []
        self.diverged_versions: list[int] = []

    def record(self, model: GlobalModel, *, published_at: float, evaluated_at: float) -> None:
        """Evaluate `model` (as the evaluator does: load into the task's model) and log it."""
        self._local.load_global(model)
        try:
            result = evaluate(self._local.model, self._test)
        except ValueError:  # non-finite scores: the weights diverged
            result = EvalResult(DIVERGED_LOSS, 0.0, math.nan, (), len(self._test))
            self.diverged_versions.append(model.version)
        per_class = result.per_class_accuracy
        report = EvalReport(
            task_id=model.task_id,
            version=model.version,
            loss=result.loss if math.isfinite(result.loss) else DIVERGED_LOSS,
            accuracy=result.accuracy,
            auc=None if math.isnan(result.auc) else result.auc,
            per_class_accuracy=() if any(math.isnan(a) for a in per_class) else per_class,
            num_examples=result.num_examples,
            updates_applied=model.updates_applied,
            model_published_at=published_at,
            evaluated_at=evaluated_at,
        )
        append_eval_report(self._log, report)
        self.reports.append(report)
        self.last_version = model.version
