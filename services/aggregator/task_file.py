"""Read a task file, reporting a problem as the file, the line and the field to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from services.common.boundary import validation_line
from services.common.errors import MissingInput, TaskFileError


def read_task_mapping(path: Path) -> dict[str, Any]:
    """The task file's top-level mapping; `MissingInput` or `TaskFileError` when unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MissingInput(
            f"task file {path} does not exist", hint="check --task-file or FEDMQ_TASK_FILE"
        ) from None
    except OSError as error:
        raise TaskFileError(f"cannot read task file {path}: {error.strerror}") from error
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise TaskFileError(f"{where}: not valid YAML ({problem})") from error
    except json.JSONDecodeError as error:
        raise TaskFileError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(raw, dict):
        raise TaskFileError(f"{path}: a task file is a mapping with `spec` and `strategy`")
    return raw


def invalid_task(path: Path, error: ValidationError) -> TaskFileError:
    """`path:line: field: problem` for the first invalid field, then the others."""
    first = error.errors(include_url=False)[0]
    line = field_line(path, tuple(first["loc"]))
    where = f"{path}:{line}" if line is not None else str(path)
    unknown = " (unknown field: check its spelling)" if first["type"] == "extra_forbidden" else ""
    return TaskFileError(f"{where}: {validation_line(error)}{unknown}")


def field_line(path: Path, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest key of `loc` the file has, or None when unknown."""
    try:
        node = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next((pair for pair in node.value if pair[0].value == part), None)
        if match is None:
            break
        key, node = match
        line = key.start_mark.line + 1
    return line
