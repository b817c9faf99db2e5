"""A real aggregator with trainer keys: forged, unknown, replayed and impersonating updates.

Each trainer has its own broker user (RabbitMQ checks `user_id` against the login), and
the aggregator runs with `--require-user-id-match`, as a production deployment would.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pika
import pytest

from schemas import CONTENT_TYPE, SCHEMA_HEADER, SCHEMA_VERSION, GlobalModel, ModelUpdate, encode
from services.aggregator.identity import KEY_RELOAD_CHECK_S
from services.common.bus.pika_bus import PikaBus
from services.common.signing import generate_keypair, public_key_line, sign_update
from services.common.topology import (
    UPDATES_EXCHANGE,
    events_queue,
    follower_queue_name,
    update_key,
)
from tests.conftest import BrokerNames
from tests.integration.conftest import BrokerUser
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ALPHA = 0.5
DEAD_LETTER_TIMEOUT_S = 30.0
JOIN_TIMEOUT_S = 180.0
"""The aggregator imports torch before it serves: slow on a loaded machine."""


@dataclass(frozen=True)
class Site:
    """A trainer with its own broker login (= its trainer id) and its own signing key."""

    user: BrokerUser
    signing_key: bytes
    public_key: bytes

    @property
    def trainer_id(self) -> str:
        return self.user.name


class SigningProbe:
    """A `FederationProbe` (joins, follows, reads dead letters) that signs and publishes
    as any broker user, with any `user_id`."""

    def __init__(self, probe: FederationProbe) -> None:
        self.probe = probe

    def update(
        self, model: GlobalModel, fill: float, site: Site, *, created_at: float | None = None
    ) -> ModelUpdate:
        """`site`'s signed update whose delta is `fill` everywhere."""
        unsigned = self.probe.update(model, fill, trainer_id=site.trainer_id)
        if created_at is not None:
            unsigned = unsigned.model_copy(update={"created_at": created_at})
        return sign_update(unsigned, site.signing_key)

    def publish_as(self, url: str, update: ModelUpdate, *, user_id: str | None) -> str:
        """Publish with plain pika, logged in through `url`; returns the message id."""
        message_id = uuid.uuid4().hex
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            type="model_update",
            message_id=message_id,
            user_id=user_id,
            headers={SCHEMA_HEADER: SCHEMA_VERSION},
            delivery_mode=2,
        )
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            key = update_key(self.probe.task_id, update.trainer_id)
            channel.basic_publish(UPDATES_EXCHANGE, key, encode(update), properties)
        finally:
            connection.close()
        return message_id

    def reasons_for(self, message_ids: set[str]) -> dict[str, str]:
        """The dead-letter reason of each of `message_ids` (other tests' letters ignored)."""
        reasons: dict[str, str] = {}
        deadline = time.monotonic() + DEAD_LETTER_TIMEOUT_S
        while set(reasons) != message_ids and time.monotonic() < deadline:
            for letter in self.probe.dead_letters():
                if letter.message_id in message_ids:
                    assert letter.detail, f"{letter.reason} without a detail"
                    reasons[letter.message_id] = letter.reason
            time.sleep(0.1)
        return reasons


@pytest.fixture
def make_site(make_broker_user: Callable[..., BrokerUser]) -> Callable[[], Site]:
    def make() -> Site:
        user = make_broker_user(write=r"^fedmq\.updates$")
        signing_key, public_key = generate_keypair()
        return Site(user, signing_key, public_key)

    return make


@pytest.fixture
def site(make_site: Callable[[], Site]) -> Site:
    return make_site()


@pytest.fixture
def keys_file(tmp_path: Path, site: Site) -> Path:
    path = tmp_path / "trainer_keys"
    path.write_text(f"# test federation\n{public_key_line(site.trainer_id, site.public_key)}\n")
    return path


@pytest.fixture
def task_id(broker_names: BrokerNames) -> str:
    task_id = broker_names.task_id("ident")
    broker_names.track_queue(events_queue("aggregator", task_id).name)
    return task_id


@pytest.fixture
def aggregator(task_id: str, tmp_path: Path, keys_file: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        [
            "aggregator", "--task-id", task_id, "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--model", "cnn-small", "--strategy", "fedasync", "--alpha", str(ALPHA),
            "--staleness", "constant", "--trainer-keys", str(keys_file),
            "--require-user-id-match",
        ],
        log_path=tmp_path / "aggregator.log",
    )  # fmt: skip
    yield process
    assert process.terminate() == 0, process.output()[-3000:]


@pytest.fixture
def signer(
    bus: PikaBus, task_id: str, site: Site, broker_names: BrokerNames, amqp_url: str
) -> SigningProbe:
    broker_names.track_queue(follower_queue_name(task_id, site.trainer_id))
    return SigningProbe(FederationProbe(bus, task_id, site.trainer_id, amqp_url=amqp_url))


def _floats(model: GlobalModel) -> np.ndarray:
    return np.concatenate(
        [t.to_numpy().ravel() for t in model.tensors if t.dtype.startswith("float")]
    )


def test_only_signed_fresh_updates_from_the_logged_in_trainer_are_applied(
    signer: SigningProbe,
    site: Site,
    make_site: Callable[[], Site],
    aggregator: ServiceProcess,
    amqp_url: str,
) -> None:
    # Given an aggregator that knows one site's key, and a probe that joined at version 0
    probe = signer.probe
    # (the probe's connection is the shared login, so it joins under that name)
    start = probe.join(timeout=JOIN_TIMEOUT_S, as_id="guest", user_id="guest").model
    assert start.version == 0
    intruder = make_site()  # a broker user, but with no key registered at the aggregator
    good = signer.update(start, 0.2, site)

    # When the site sends one correct update, and then every kind of bad one
    signer.publish_as(site.user.url, good, user_id=site.trainer_id)
    v1 = probe.newest_model(min_version=1)
    forged = sign_update(probe.update(start, 0.3, trainer_id=site.trainer_id), intruder.signing_key)
    unknown = signer.update(start, 0.3, intruder)
    stale_clock = signer.update(start, 0.3, site, created_at=time.time() - 3600)
    impersonation = signer.update(start, 0.3, site)
    bad = {
        signer.publish_as(site.user.url, forged, user_id=site.trainer_id): "bad-signature",
        signer.publish_as(intruder.user.url, unknown, user_id=intruder.trainer_id):
            "unknown-trainer",
        signer.publish_as(site.user.url, good, user_id=site.trainer_id): "duplicate",
        signer.publish_as(site.user.url, stale_clock, user_id=site.trainer_id): "replay",
        signer.publish_as(amqp_url, impersonation, user_id="guest"): "identity-mismatch",
    }  # fmt: skip

    # Then each bad one is dead-lettered with its reason, and only the good one moved the model
    assert signer.reasons_for(set(bad)) == bad
    np.testing.assert_allclose(_floats(v1), _floats(start) + ALPHA * 0.2, rtol=1e-6, atol=1e-7)
    after = signer.update(v1, 0.1, site)
    signer.publish_as(site.user.url, after, user_id=site.trainer_id)
    v2 = probe.newest_model(min_version=2)
    assert (v2.version, v2.updates_applied) == (2, 2)
    assert aggregator.alive()


def test_a_key_added_to_the_keys_file_is_accepted_without_a_restart(
    signer: SigningProbe,
    make_site: Callable[[], Site],
    keys_file: Path,
    aggregator: ServiceProcess,
) -> None:
    # Given a new site whose key the aggregator does not know yet
    probe = signer.probe
    # (the probe's connection is the shared login, so it joins under that name)
    start = probe.join(timeout=JOIN_TIMEOUT_S, as_id="guest", user_id="guest").model
    newcomer = make_site()
    early = signer.update(start, 0.1, newcomer)
    refused = signer.publish_as(newcomer.user.url, early, user_id=newcomer.trainer_id)
    assert signer.reasons_for({refused}) == {refused: "unknown-trainer"}
    # When the operator appends its public key line, and the reload interval passes
    with keys_file.open("a") as keys:
        keys.write(public_key_line(newcomer.trainer_id, newcomer.public_key) + "\n")
    time.sleep(KEY_RELOAD_CHECK_S + 0.5)
    # Then its next update is applied
    later = signer.update(start, 0.1, newcomer)
    signer.publish_as(newcomer.user.url, later, user_id=newcomer.trainer_id)
    assert probe.newest_model(min_version=1).updates_applied == 1
    assert aggregator.alive()
