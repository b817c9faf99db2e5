"""`run.json`: what a run directory holds (name, kind, strategy, model, start time, config)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.report.errors import InvalidRunLog, RunNotFound

MANIFEST_FILE = "run.json"
"""Name of the manifest inside a run directory."""

RunKind = Literal["federated", "centralized"]


class RunManifest(BaseModel):
    """Describes one run; `started_at` (unix seconds) is time zero of every report axis."""

    # Unknown keys are ignored so that an older `fedmq report` still reads newer manifests.
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    """Label of the run in tables and plot legends."""
    kind: RunKind
    strategy: Annotated[str, Field(max_length=64)] | None = None
    """Aggregation strategy (`fedbuff`, `fedasync`, `fedavg`, ...); None for centralized runs."""
    model: Annotated[str, Field(min_length=1, max_length=64)]
    started_at: Annotated[float, Field(allow_inf_nan=False)]
    config: dict[str, Any] = Field(default_factory=dict)
    """Free-form settings of the run (hyperparameters, data source, ...), JSON-serialisable."""


def write_manifest(run_dir: str | os.PathLike[str], manifest: RunManifest) -> Path:
    """Write `<run_dir>/run.json` atomically (temp file, fsync, rename); create `run_dir`."""
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_FILE
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as sink:
            sink.write(text)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_manifest(run_dir: str | os.PathLike[str]) -> RunManifest:
    """Read `<run_dir>/run.json`; `RunNotFound` when absent, `InvalidRunLog` when malformed."""
    path = Path(run_dir) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise RunNotFound(
            f"{path} not found: a run directory needs a {MANIFEST_FILE} manifest "
            "(written by `fedmq centralized`, `fedmq demo` or `write_manifest`)"
        ) from error
    try:
        return RunManifest.model_validate_json(text)
    except ValidationError as error:
        raise InvalidRunLog(f"{path} is not a valid run manifest: {error}") from error
