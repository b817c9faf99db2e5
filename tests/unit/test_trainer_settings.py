"""Trainer settings and CLI: environment first, flags on top, simulation aids validated."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from pydantic import ValidationError

from services.cli import build_parser
from services.trainer.cli import settings_from_args
from services.trainer.service import broker_login
from services.trainer.settings import TrainerSettings


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["trainer", *argv])


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_TRAINER_ID", "from-env")
    monkeypatch.setenv("FEDMQ_SEED", "4")
    monkeypatch.setenv("FEDMQ_TASK_ID", "derma")

    settings = settings_from_args(_parse("--trainer-id", "from-flag", "--max-updates", "3"))

    assert settings.trainer_id == "from-flag"
    assert settings.max_updates == 3
    assert settings.seed == 4
    assert settings.task_id == "derma"
    assert settings.torch_threads == 1
    assert settings.data_source == "medmnist:pneumoniamnist"


def test_simulated_site_flags_reach_the_settings() -> None:
    settings = settings_from_args(
        _parse(
            "--trainer-id", "s2", "--site-index", "2", "--num-sites", "4",
            "--partition", "dirichlet", "--dirichlet-alpha", "0.1", "--simulated-slowdown", "3",
        )
    )  # fmt: skip

    assert (settings.site_index, settings.num_sites) == (2, 4)
    assert settings.partition == "dirichlet"
    assert settings.dirichlet_alpha == 0.1
    assert settings.simulated_slowdown == 3.0


def test_a_trainer_needs_an_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMQ_TRAINER_ID", raising=False)
    with pytest.raises(ValidationError, match="trainer_id"):
        TrainerSettings()


@pytest.mark.parametrize(
    "overrides",
    [
        {"site_index": 4, "num_sites": 4},
        {"simulated_slowdown": 0.5},
        {"trainer_id": "has.dots"},
        {"torch_threads": 0},
        {"partition": "random"},
    ],
)
def test_invalid_trainer_settings_are_refused(overrides: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"trainer_id": "site-a", **overrides}
    with pytest.raises(ValidationError):
        TrainerSettings(**fields)


def test_the_slowdown_flag_is_labelled_as_a_simulation_aid(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _parse("--help")
    assert "SIMULATION AID" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("url", "login"),
    [
        ("amqp://guest:guest@localhost:5672/%2F", "guest"),
        ("amqps://site%2Da:secret@broker.example:5671/fl", "site-a"),
        ("amqps://broker.example:5671/fl", None),
    ],
)
def test_the_user_id_sent_is_the_broker_login(url: str, login: str | None) -> None:
    assert broker_login(url) == login
