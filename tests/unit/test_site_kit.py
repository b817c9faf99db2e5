"""`fedmq site`: the rights a site gets, its kit, and the definitions change without the API."""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path
from types import ModuleType

import pytest

from services.cli import main
from services.common.errors import EXIT_USAGE
from services.sites.rights import follower_permissions, trainer_topic_permissions
from tests.support.processes import REPO


def _generator() -> ModuleType:
    path = REPO / "infra" / "rabbitmq" / "generate_definitions.py"
    spec = importlib.util.spec_from_file_location("generate_definitions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_real_site_gets_exactly_the_rights_of_a_simulated_trainer() -> None:
    generator = _generator()
    assert follower_permissions("t1", "hospital-x") == generator.follower_permissions(
        "t1", "hospital-x"
    )
    assert trainer_topic_permissions("t1", "hospital-x") == generator.trainer_topic_permissions(
        "t1", "hospital-x"
    )


def test_without_api_access_the_site_is_written_into_definitions_and_removed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a definitions file and no management API
    definitions = tmp_path / "definitions.json"
    definitions.write_text(json.dumps({"users": [{"name": "aggregator", "tags": []}]}))
    monkeypatch.setenv("FEDMQ_AMQP_URL", "amqps://admin:pw@broker.example.org:5671/fedmq")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    kit, keys = tmp_path / "kit", tmp_path / "keys"
    # When a site is added
    code = main([
        "site", "add", "hospital-x", "--task-id", "t1", "--definitions", str(definitions),
        "--out", str(kit), "--keys-dir", str(keys), "--ca-file", str(ca),
        "--data-folder", "/srv/images",
    ])  # fmt: skip
    assert code == 0
    # Then its user, permissions and topic permissions are in the file
    document = json.loads(definitions.read_text())
    assert [u["name"] for u in document["users"]] == ["aggregator", "hospital-x"]
    (permission,) = [p for p in document["permissions"] if p["user"] == "hospital-x"]
    assert permission["vhost"] == "fedmq"
    assert permission["configure"] == r"^(fedmq\.t1\.follow\.hospital\-x)$"
    assert len([t for t in document["topic_permissions"] if t["user"] == "hospital-x"]) == 3
    # and the kit holds what the site needs, its secrets readable by the owner only
    env = dict(line.split("=", 1) for line in (kit / "site.env").read_text().splitlines())
    assert env["FEDMQ_AMQP_URL"].startswith("amqps://hospital-x:")
    assert env["FEDMQ_AMQP_URL"].endswith("@broker.example.org:5671/fedmq")
    assert env["FEDMQ_TRAINER_ID"] == "hospital-x" and env["FEDMQ_TASK_ID"] == "t1"
    assert env["FEDMQ_DATA_SOURCE"] == "folder:/srv/images"
    assert env["FEDMQ_CA_FILE"] == "ca.pem" and (kit / "ca.pem").read_text() == ca.read_text()
    assert stat.S_IMODE((kit / "hospital-x.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((kit / "site.env").stat().st_mode) == 0o600
    assert (keys / "hospital-x.pub").read_text().startswith("hospital-x ed25519:")
    assert "-v /srv/images:/srv/images:ro fedmq:dev trainer" in capsys.readouterr().out
    # When it is removed, then user, permissions and key are gone
    assert main(["site", "remove", "hospital-x", "--definitions", str(definitions),
                 "--keys-dir", str(keys)]) == 0  # fmt: skip
    document = json.loads(definitions.read_text())
    assert [u["name"] for u in document["users"]] == ["aggregator"]
    assert all(p["user"] != "hospital-x" for p in document["permissions"])
    assert not (keys / "hospital-x.pub").exists()


def test_a_site_name_that_cannot_be_a_routing_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["site", "add", "hospital.x", "--definitions", str(tmp_path / "d.json")])
    assert code == EXIT_USAGE
    assert "invalid site name 'hospital.x'" in capsys.readouterr().err
