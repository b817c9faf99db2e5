"""`--help` is generated from the settings models: a sentence, choices, default and variable."""

from __future__ import annotations

import argparse

import pytest

from services.aggregator.settings import AggregatorSettings
from services.cli import build_parser, main
from services.common.model_names import MODEL_NAMES
from services.common.settings import ServiceSettings
from services.evaluator.settings import EvaluatorSettings
from services.trainer.settings import TrainerSettings

SETTINGS = {
    "aggregator": AggregatorSettings,
    "trainer": TrainerSettings,
    "evaluator": EvaluatorSettings,
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subcommands.choices)


@pytest.mark.parametrize("model", [*SETTINGS.values(), ServiceSettings])
def test_every_settings_field_has_a_sentence_for_its_help(model: type[ServiceSettings]) -> None:
    undocumented = [name for name, info in model.model_fields.items() if not info.description]
    assert undocumented == []


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_every_settings_field_is_a_flag_whose_help_names_its_default_and_variable(
    command: str,
) -> None:
    parser = _commands()[command]
    by_dest = {action.dest: action for action in parser._actions}
    for field in SETTINGS[command].model_fields:
        action = by_dest.get(field)
        assert action is not None, f"no flag sets {field}"
        assert action.help and "default: " in action.help, field
        assert f"env FEDMQ_{field.upper()}" in action.help, field


def test_aggregator_help_lists_strategies_models_and_robust_aggregators_with_defaults() -> None:
    text = " ".join(_commands()["aggregator"].format_help().split())
    assert "one of fedasync, fedbuff, fedavg" in text
    assert "one of mean, median, trimmed_mean" in text
    assert all(name in text for name in MODEL_NAMES)
    undocumented = [
        action.option_strings
        for action in _commands()["aggregator"]._actions
        if action.option_strings and not action.help
    ]
    assert undocumented == []


def test_every_command_takes_amqp_url_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for name, command in _commands().items():
        options = {o for action in command._actions for o in action.option_strings}
        assert {"--amqp-url", "--version"} <= options, name
    with pytest.raises(SystemExit) as exit_:
        main(["watch", "--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("fedmq ")


def test_model_names_are_the_zoo_s_models() -> None:
    from services.common.models import available_models

    assert available_models() == MODEL_NAMES


def test_a_generated_flag_reaches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trainer.cli import settings_from_args

    monkeypatch.delenv("FEDMQ_METRICS_PORT", raising=False)
    args = build_parser().parse_args(
        ["trainer", "--trainer-id", "s", "--metrics-port", "0", "--log-level", "debug"]
    )
    settings = settings_from_args(args)
    assert (settings.metrics_port, settings.log_level) == (0, "DEBUG")
