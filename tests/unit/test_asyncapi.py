"""docs/asyncapi.yaml is generated from the pydantic models, and the check notices drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from schemas import ModelUpdate
from schemas.messages import MESSAGE_TYPES
from services.common import asyncapi


def test_the_checked_in_document_equals_what_the_code_generates() -> None:
    diff = asyncapi.differences()
    assert diff == [], f"run `{asyncapi.REGENERATE}`:\n" + "\n".join(diff[:40])


def test_adding_a_field_to_a_message_model_without_regenerating_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a document generated from today's models, which the check accepts
    document = tmp_path / "asyncapi.yaml"
    assert asyncapi.main(["--out", str(document)]) == 0
    assert asyncapi.main(["--check", "--out", str(document)]) == 0

    # When a field is added to the model_update message and nobody regenerates
    class ExtendedUpdate(ModelUpdate):
        priority: int = 0

    extended = {**MESSAGE_TYPES, "model_update": ExtendedUpdate}
    monkeypatch.setattr(asyncapi, "MESSAGE_TYPES", extended)
    capsys.readouterr()
    code = asyncapi.main(["--check", "--out", str(document)])

    # Then the check fails, and its diff shows the new field and the command to run
    captured = capsys.readouterr()
    assert code == 1
    assert "+        priority:" in captured.out
    assert asyncapi.REGENERATE in captured.err


def test_every_kind_has_a_message_whose_payload_requires_schema_and_kind() -> None:
    document = yaml.safe_load(asyncapi.DOCUMENT.read_text())
    messages = document["components"]["messages"]
    for kind, cls in MESSAGE_TYPES.items():
        message = next(m for m in messages.values() if m["name"] == kind)
        payload = message["payload"]
        assert payload["required"][:2] == ["schema", "kind"]
        assert payload["properties"]["kind"]["const"] == kind
        assert set(payload["properties"]) == {"schema", *cls.model_fields}
        assert message["bindings"]["amqp"]["messageType"] == kind
