"""`fedmq site add` end to end: a hospital's kit is all its trainer needs, and no more."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from services.common.bus import AccessRefused
from services.common.bus.pika_bus import PikaBus
from services.common.topology import (
    MODELS_EXCHANGE,
    UPDATES_EXCHANGE,
    follower_queue_name,
    model_key,
    own_follower_topology,
    update_key,
)
from services.sites.management import Management
from tests.integration.conftest import FAST_RECONNECT
from tests.support.fault_kit import EventTap
from tests.support.processes import REPO, ServiceProcess, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]

FEDMQ = Path(sys.executable).parent / "fedmq"


def _images(root: Path, per_class: int = 12) -> Path:
    for label, shade in (("normal", 40), ("pneumonia", 200)):
        folder = root / label
        folder.mkdir(parents=True)
        for k in range(per_class):
            Image.new("L", (28, 28), shade + k).save(folder / f"{k}.png")
    return root


def _site(*argv: str, amqp_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "site", *argv, "--amqp-url", amqp_url],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


@pytest.fixture
def names(amqp_url: str) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    site = f"hospital-x-{suffix}"
    yield f"sitekit-{suffix}", site
    # a failed test must not leave its broker user behind (absent after `site remove`)
    Management.for_broker(amqp_url).delete(f"users/{site}")


def test_a_site_added_in_one_command_joins_is_applied_and_is_confined_until_removed(
    amqp_url: str, tmp_path: Path, names: tuple[str, str]
) -> None:
    task_id, site = names
    keys, kit = tmp_path / "trainer-keys", tmp_path / "kit"
    # Given a site added in one command, with a folder of its own images
    added = _site(
        "add", site, "--task-id", task_id, "--out", str(kit), "--keys-dir", str(keys),
        "--data-folder", str(_images(tmp_path / "images")), amqp_url=amqp_url,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "docker run" in added.stdout and f"{site}.pub" in os.listdir(keys)
    tap = EventTap(amqp_url, task_id)
    aggregator = ServiceProcess(
        [
            "aggregator", "--task-id", task_id, "--trainer-keys", str(keys),
            "--require-user-id-match", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--buffer-size", "1", "--local-steps", "2",
        ],
        log_path=tmp_path / "aggregator.log", env={"FEDMQ_AMQP_URL": amqp_url},
    )  # fmt: skip
    # When a trainer starts from nothing but the kit's env file, in the kit's folder
    trainer = subprocess.Popen(
        [str(FEDMQ), "trainer"],
        cwd=kit,
        env={"PATH": os.environ["PATH"], **_env_file(kit / "site.env")},
        stdout=(tmp_path / "trainer.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # Then it joins and its signed updates are applied under its own login
        wait_for(
            lambda: any(
                e.get("updates_applied", 0) >= 1 and e.get("updates_rejected") == 0
                for e in tap.of("model.published")
            ),
            timeout=180, what="an update of the new site applied",
        )  # fmt: skip
        assert [e["trainer_id"] for e in tap.of("trainer.joined")] == [site]
        _assert_confined(amqp_url, _env_file(kit / "site.env")["FEDMQ_AMQP_URL"], task_id, site)
    finally:
        trainer.terminate()
        trainer.wait(30)
        aggregator.terminate()
        tap.close()
    # When the site is removed, then its login and key are gone: the next publish is refused
    removed = _site("remove", site, "--keys-dir", str(keys), amqp_url=amqp_url)
    assert removed.returncode == 0, removed.stderr
    assert not (keys / f"{site}.pub").exists()
    site_url = _env_file(kit / "site.env")["FEDMQ_AMQP_URL"]
    with (
        pytest.raises(AccessRefused, match="refused the login"),
        PikaBus(site_url, connect_timeout=10) as bus,
    ):
        bus.publish(UPDATES_EXCHANGE, update_key(task_id, site), b"u", kind="ModelUpdate")
    listed = _site("list", "--keys-dir", str(keys), amqp_url=amqp_url)
    assert site not in listed.stdout


def _assert_confined(admin_url: str, site_url: str, task_id: str, site: str) -> None:
    other = "hospital-other"
    with PikaBus(admin_url) as admin:
        # another site's queue, holding a model (an empty queue is answered without a read)
        admin.declare(own_follower_topology(task_id, other))
        admin.publish(MODELS_EXCHANGE, model_key(task_id), b"m", kind="GlobalModel")
    try:
        # It may not publish an update in another site's name ...
        with (
            PikaBus(site_url, reconnect=FAST_RECONNECT) as bus,
            pytest.raises(AccessRefused, match="ACCESS_REFUSED"),
        ):
            bus.publish(UPDATES_EXCHANGE, update_key(task_id, other), b"u", kind="ModelUpdate")
        # ... nor read another site's queue
        with (
            PikaBus(site_url, reconnect=FAST_RECONNECT) as bus,
            pytest.raises(AccessRefused, match="ACCESS_REFUSED"),
        ):
            bus.get(follower_queue_name(task_id, other))
    finally:
        with PikaBus(admin_url) as admin:
            admin.delete_queue(follower_queue_name(task_id, other))
