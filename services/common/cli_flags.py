"""Command-line flags generated from settings models: each `FEDMQ_*` field becomes a flag.

A flag's help is the field's docstring, its choices (a `Literal`), its default and its
environment variable, so `--help` and the settings classes cannot drift apart. A service may
list some flags by hand (`SettingFlag`) to keep a shorter name or its own sentence; every other
field of the model is added with the name of the field.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

SettingFlag = tuple[str, str, type, str]
"""(flag, settings field, type, help); an empty help takes the field's docstring."""

ENV_PREFIX = "FEDMQ_"
_SETTING_FLAGS_KEY = "_setting_flags"

COMMON_FLAGS: tuple[SettingFlag, ...] = (
    ("--amqp-url", "amqp_url", str, ""),
    ("--amqp-urls", "amqp_urls", str, ""),
    ("--data-source", "data_source", str, ""),
    ("--data-dir", "data_dir", Path, ""),
    ("--torch-threads", "torch_threads", int, ""),
    ("--join-timeout", "join_timeout", float, ""),
    ("--log-level", "log_level", str, ""),
)


def add_setting_flags(
    parser: argparse.ArgumentParser,
    flags: Sequence[SettingFlag],
    *,
    choices: Mapping[str, tuple[str, ...]] | None = None,
    model: type[BaseModel] | None = None,
) -> None:
    """Add one optional flag per settings field (absent flags leave the environment's value).

    With `model`, help comes from the model's fields and its remaining fields get flags too.
    """
    listed = list(flags)
    if model is not None:
        taken = {field for _flag, field, _kind, _help in listed}
        taken |= {option for action in parser._actions for option in action.option_strings}
        listed += [flag for flag in model_flags(model) if not {flag[0], flag[1]} & taken]
    for flag, field, kind, text in listed:
        info = None if model is None else model.model_fields.get(field)
        add_field_flag(
            parser, flag, field, kind, text, info, (choices or {}).get(field), env=model is not None
        )
    previous = tuple(parser.get_default(_SETTING_FLAGS_KEY) or ())
    parser.set_defaults(**{_SETTING_FLAGS_KEY: previous + tuple(listed)})


def given_settings(args: argparse.Namespace, flags: Sequence[SettingFlag]) -> dict[str, Any]:
    """The settings fields whose flags were given, ready to lay over the environment."""
    every = getattr(args, _SETTING_FLAGS_KEY, None) or flags
    values = {field: getattr(args, field, None) for _flag, field, _kind, _help in every}
    return {field: value for field, value in values.items() if value is not None}


def model_flags(model: type[BaseModel]) -> list[SettingFlag]:
    """A flag for every field of `model` whose type a command line can carry."""
    flags: list[SettingFlag] = []
    for field, info in model.model_fields.items():
        kind = flag_type(info.annotation)
        if kind is not None:
            flags.append((f"--{field.replace('_', '-')}", field, kind, ""))
    return flags


def add_field_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    field: str,
    kind: type,
    text: str,
    info: FieldInfo | None,
    choices: tuple[str, ...] | None = None,
    *,
    env: bool = False,
    dest: str | None = None,
    default: str | None = None,
) -> None:
    """Add `flag` for `field`, its help built from `text` or the field's docstring.

    `default` replaces the field's own default in the help (a command that fills it in).
    """
    options = choices or (literal_choices(info.annotation) if info is not None else None)
    help_text = describe(field, text, info, options, env=env, default=default)
    destination = dest or field
    if kind is bool:
        parser.add_argument(
            flag, dest=destination, action=argparse.BooleanOptionalAction, default=None,
            help=help_text,
        )  # fmt: skip
        return
    if options and all(isinstance(o, str) and o.isupper() for o in options):
        kind = str.upper  # type: ignore[assignment]  # log levels: accept any case
    parser.add_argument(
        flag, dest=destination, type=kind, choices=options, help=help_text,
        metavar=None if options else field.upper(),
    )  # fmt: skip


def describe(
    field: str,
    text: str,
    info: FieldInfo | None,
    choices: Sequence[str] | None,
    *,
    env: bool,
    default: str | None = None,
) -> str:
    """One sentence, then the choices, the default and the environment variable."""
    sentence = text or (info.description if info is not None else None) or ""
    sentence = " ".join(sentence.split()) or field.replace("_", " ")
    facts = []
    if choices:
        facts.append(f"one of {', '.join(str(c) for c in choices)}")
    if default is not None:
        facts.append(f"default: {default}")
    elif info is not None:
        facts.append(f"default: {_default_text(info)}")
    if env:
        facts.append(f"env {ENV_PREFIX}{field.upper()}")
    tail = f" ({'; '.join(facts)})" if facts else ""
    return (sentence + tail).replace("%", "%%")


def flag_type(annotation: Any) -> type | None:
    """The argparse type of a field's annotation: int, float, str, Path, bool, or None."""
    inner = _without_none(annotation)
    if inner in (int, float, str, Path, bool):
        return typing.cast(type, inner)
    if typing.get_origin(inner) is typing.Annotated:
        return flag_type(typing.get_args(inner)[0])
    if typing.get_origin(inner) is list and typing.get_args(inner) == (str,):
        return str  # comma-separated: the model's validator splits it
    if typing.get_origin(inner) is typing.Literal:
        values = typing.get_args(inner)
        return type(values[0]) if len({type(v) for v in values}) == 1 else None
    return None


def literal_choices(annotation: Any) -> tuple[str, ...] | None:
    """The values of a `Literal` annotation (also inside `Optional`), else None."""
    inner = _without_none(annotation)
    if typing.get_origin(inner) is typing.Literal:
        return tuple(typing.get_args(inner))
    return None


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return "derived"
    value = info.default
    if value is PydanticUndefined or value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
