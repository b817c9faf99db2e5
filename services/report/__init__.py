"""Run reports: read run directories (manifest + eval log), summarise, tabulate and plot them."""

from services.report.errors import EmptyRunLog, InvalidRunLog, RunLogError, RunNotFound
from services.report.logs import (
    EVAL_LOG_FILE,
    EvalPoint,
    Run,
    append_eval_report,
    load_run,
    read_eval_log,
)
from services.report.manifest import MANIFEST_FILE, RunManifest, read_manifest, write_manifest
from services.report.summary import (
    RunSummary,
    TargetResult,
    summarize,
    time_to_reach,
    updates_to_reach,
)

__all__ = [
    "EVAL_LOG_FILE",
    "MANIFEST_FILE",
    "EmptyRunLog",
    "EvalPoint",
    "InvalidRunLog",
    "Run",
    "RunLogError",
    "RunManifest",
    "RunNotFound",
    "RunSummary",
    "TargetResult",
    "append_eval_report",
    "load_run",
    "read_eval_log",
    "read_manifest",
    "summarize",
    "time_to_reach",
    "updates_to_reach",
    "write_manifest",
]
