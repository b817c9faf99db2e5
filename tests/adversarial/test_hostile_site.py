"""Each attack of a malicious site, against live processes and the shipped broker permissions.

Every test asserts the same outcome: the victim and the aggregator keep running, the
honest site's valid updates are still applied, the hostile message is dead-lettered with
a reason naming the broker-verified sender, the aggregator's RSS stays under a stated
bound, and the newest checkpoint holds only finite values.
"""

from __future__ import annotations

import os
import signal

import pika
import pytest

from schemas import Heartbeat, JoinAccepted, JoinRequest, Rejection, TrainerLeft, encode
from services.aggregator.poison import MARKER_NAME, POISON_STRIKES, fingerprint
from services.common.bus import Delivery, MessageProperties
from services.common.bus.pika_bus import PikaBus
from services.common.messaging import call_message
from services.common.topology import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    UPDATES_EXCHANGE,
    event_key,
    follower_queue_name,
    join_key,
    update_key,
    updates_queue,
)
from tests.adversarial.conftest import ATTACKER, HONEST, VICTIM, Federation, valid_update
from tests.support.adversary import ADMIN, TASK, DeadLetter, publish_as, refused_code
from tests.support.fault_kit import log_events
from tests.support.processes import wait_for

pytestmark = [pytest.mark.adversarial, pytest.mark.broker, pytest.mark.slow]

RSS_BOUND = 64 * 2**20
"""What one attack may add to the aggregator's resident memory (a bomb used to cost ~1.2 GiB)."""
ACCESS_REFUSED = 403


def _letter(federation: Federation, message_id: str) -> DeadLetter:
    found: list[DeadLetter] = []

    def arrived() -> bool:
        letter = federation.dead.of(message_id)
        if letter is not None:
            found.append(letter)
        return bool(found)

    wait_for(arrived, timeout=30, what=f"dead letter of {message_id}")
    return found[0]


def test_a_join_aiming_its_reply_at_another_sites_queue_gets_no_reply_and_is_dead_lettered(
    federation: Federation,
) -> None:
    rss = federation.aggregator_rss()
    url = federation.node.url(ATTACKER)
    join = encode(JoinRequest(task_id=TASK, trainer_id=ATTACKER, num_examples=10))
    # Given joins whose reply_to names the victim's follower queue and the dead-letter queue
    targets = (follower_queue_name(TASK, VICTIM), "fedmq.dead")
    sent = {
        target: publish_as(
            url,
            CONTROL_EXCHANGE,
            join_key(TASK),
            join,
            kind="join_request",
            user_id=ATTACKER,
            reply_to=target,
        )
        for target in targets
    }
    # Then each is dead-lettered as bad-reply-to, naming the attacker's verified login
    for message_id in sent.values():
        letter = _letter(federation, message_id)
        assert letter.reason == "bad-reply-to"
        assert letter.sender == ATTACKER and f"sent by '{ATTACKER}'" in letter.detail
    # and no model went into the dead-letter queue (only the 115-byte joins did)
    assert all(d.size < 1000 for d in federation.dead.read())
    federation.assert_healthy(rss_before=rss, rss_bound=RSS_BOUND)
    assert not log_events(federation.victim, "trainer failed")


def test_a_foreign_message_in_a_followers_queue_is_dropped_and_the_follower_goes_on(
    federation: Federation,
) -> None:
    # Given garbage in the victim's and the evaluator's follower queues, put there through
    # the default exchange by the only logins able to (the operator's, or the aggregator's
    # through a bug)
    sent_before = len(log_events(federation.victim, "update sent"))
    for follower in (VICTIM, "evaluator"):
        publish_as(
            federation.node.url(ADMIN),
            "",
            follower_queue_name(TASK, follower),
            b"\xc1 not a model",
            kind="join_accepted",
        )
    # When each drains its queue: neither login may write to fedmq.dlx
    for process in (federation.victim, federation.evaluator):
        wait_for(
            lambda p=process: log_events(p, "could not dead-letter it; dropped"),
            timeout=120,
            what="the follower to drop the foreign message",
        )
    # Then both logged the refusal and kept running; the victim sent more updates
    wait_for(
        lambda: len(log_events(federation.victim, "update sent")) > sent_before,
        timeout=180,
        what="the victim to send another update",
    )
    assert federation.victim.alive() and federation.evaluator.alive()
    assert not log_events(federation.victim, "trainer failed")


def _nested_bomb() -> bytes:
    """64 x 64 x 64 x 12 empty maps in 3.4 MB: no container over 64 entries, 3.1M objects."""
    leaf = b"\x9c" + b"\x80" * 12
    level3 = b"\xdc\x00\x40" + leaf * 64
    level2 = b"\xdc\x00\x40" + level3 * 64
    return b"\xdc\x00\x40" + level2 * 64


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param(
            b"\xdd" + (16 * 2**20).to_bytes(4, "big") + b"\x80" * (16 * 2**20), id="16MiB-maps"
        ),
        pytest.param(_nested_bomb(), id="nested"),
        pytest.param(
            b"\xdf"
            + (400_000).to_bytes(4, "big")
            + b"".join(b"\xa6k" + f"{i:05d}".encode()[-5:] + b"\xc0" for i in range(400_000)),
            id="400k-keys",
        ),
    ],
)
def test_a_decode_bomb_is_dead_lettered_before_it_costs_memory(
    federation: Federation, bomb: bytes
) -> None:
    rss = federation.aggregator_rss()
    # Given a bomb published as an update with the attacker's own login
    message_id = publish_as(
        federation.node.url(ATTACKER),
        UPDATES_EXCHANGE,
        update_key(TASK, ATTACKER),
        bomb,
        kind="model_update",
        user_id=ATTACKER,
    )
    # Then it is refused by size or structure, naming the attacker
    letter = _letter(federation, message_id)
    assert letter.reason in ("oversized", "too-complex"), letter
    assert letter.sender == ATTACKER
    grown = federation.aggregator_rss() - rss
    print(f"bomb {len(bomb)} bytes: aggregator RSS {rss / 2**20:.0f} MiB, +{grown / 2**20:.1f} MiB")
    federation.assert_healthy(rss_before=rss, rss_bound=RSS_BOUND)


def test_an_update_without_the_senders_login_is_refused_before_its_body_is_read(
    federation: Federation,
) -> None:
    rss = federation.aggregator_rss()
    # Given a large body under the attacker's routing key but without user_id
    body = b"\xdd" + (3 * 2**20).to_bytes(4, "big") + b"\x80" * (3 * 2**20)
    message_id = publish_as(
        federation.node.url(ATTACKER),
        UPDATES_EXCHANGE,
        update_key(TASK, ATTACKER),
        body,
        kind="model_update",
    )
    # Then the properties alone refuse it: identity, not a decode reason
    letter = _letter(federation, message_id)
    assert letter.reason == "identity-mismatch"
    assert "routing key" in letter.detail
    federation.assert_healthy(rss_before=rss, rss_bound=RSS_BOUND)


def test_a_site_cannot_leave_beat_or_join_in_another_sites_name(federation: Federation) -> None:
    rss = federation.aggregator_rss()
    url = federation.node.url(ATTACKER)
    left = encode(TrainerLeft(task_id=TASK, trainer_id=VICTIM, reason="shutdown"))
    # Given the victim's own departure key: the broker's topic permissions refuse it
    victim_key = event_key("trainer.left", TASK, VICTIM)
    assert refused_code(url, EVENTS_EXCHANGE, victim_key, user_id=ATTACKER) == ACCESS_REFUSED
    assert refused_code(url, EVENTS_EXCHANGE, f"trainer.left.{TASK}", user_id=ATTACKER) == 403
    # When the departure is sent under the attacker's own key, naming the victim in the body
    own_key = event_key("trainer.left", TASK, ATTACKER)
    forged = publish_as(url, EVENTS_EXCHANGE, own_key, left, kind="trainer_left", user_id=ATTACKER)
    # Then the aggregator dead-letters it, naming the attacker, and the victim stays active
    letter = _letter(federation, forged)
    assert letter.reason == "identity-mismatch" and letter.sender == ATTACKER
    assert not [
        e for e in log_events(federation.aggregator, "trainer_left") if e.get("trainer") == VICTIM
    ]
    # And a heartbeat: another site's key is refused, its name under one's own key dead-lettered
    beat = encode(Heartbeat(task_id=TASK, sender_id=VICTIM, role="trainer"))
    victim_beat = event_key("heartbeat", TASK, VICTIM)
    assert refused_code(url, EVENTS_EXCHANGE, victim_beat, user_id=ATTACKER) == ACCESS_REFUSED
    own_beat = event_key("heartbeat", TASK, ATTACKER)
    forged_beat = publish_as(
        url, EVENTS_EXCHANGE, own_beat, beat, kind="heartbeat", user_id=ATTACKER
    )
    letter = _letter(federation, forged_beat)
    assert letter.reason == "identity-mismatch" and letter.sender == ATTACKER
    # And a join as the victim, or as the evaluator, is refused with no model handed over
    bus = PikaBus(url, connection_name="attacker")
    try:
        for claimed, role in ((VICTIM, "trainer"), ("evaluator", "evaluator")):
            request = JoinRequest(task_id=TASK, trainer_id=claimed, num_examples=1, role=role)
            reply = call_message(
                bus,
                CONTROL_EXCHANGE,
                join_key(TASK),
                request,
                accept=(JoinAccepted, Rejection),
                timeout=30,
                user_id=ATTACKER,
            )
            assert isinstance(reply, Rejection) and reply.reason == "identity-mismatch", reply
    finally:
        bus.close()
    federation.assert_healthy(rss_before=rss, rss_bound=RSS_BOUND)


def test_a_forged_sender_header_does_not_make_a_dead_letter_blame_another_site(
    federation: Federation,
) -> None:
    # Given a bad update carrying fedmq's own headers, forged to blame the honest site
    message_id = publish_as(
        federation.node.url(ATTACKER),
        UPDATES_EXCHANGE,
        update_key(TASK, ATTACKER),
        b"\xc1garbage",
        kind="model_update",
        user_id=ATTACKER,
        headers={"x-fedmq-original-user-id": HONEST, "x-fedmq-reason": "innocent"},
    )
    # Then the dead letter names the verified attacker and the real reason
    letter = _letter(federation, message_id)
    assert letter.sender == ATTACKER
    assert letter.reason == "not-msgpack"


def test_a_message_in_hand_when_the_aggregator_died_is_dead_lettered_on_redelivery(
    federation: Federation,
) -> None:
    # Given the attacker's update delivered to an aggregator that then dies handling it, as
    # every aggregator before it did: the aggregator is frozen, the update is pushed to it,
    # the process is killed, and what the dying processes leave behind (the in-flight
    # marker) names that update and the crashes in a row
    update = valid_update(federation, ATTACKER)
    body = encode(update)
    os.kill(federation.aggregator.pid, signal.SIGSTOP)
    try:
        message_id = publish_as(
            federation.node.url(ATTACKER),
            UPDATES_EXCHANGE,
            update_key(TASK, ATTACKER),
            body,
            kind="model_update",
            user_id=ATTACKER,
        )
        wait_for(lambda: _ready(federation) == 0, timeout=30, what="the update to be delivered")
    finally:
        federation.aggregator.kill()
    marker = federation.checkpoint_dir / MARKER_NAME
    in_hand = Delivery(
        body=body,
        properties=MessageProperties(message_id=message_id),
        exchange=UPDATES_EXCHANGE,
        routing_key=update_key(TASK, ATTACKER),
        redelivered=False,
    )
    marker.write_text(f"{fingerprint(in_hand)} {POISON_STRIKES}")
    # When a new aggregator starts and the broker redelivers the update
    federation.aggregator = federation.start_aggregator()
    rss = federation.aggregator_rss()
    # Then it is dead-lettered as poison, naming the attacker, instead of handled again
    letter = _letter(federation, message_id)
    assert letter.reason == "poison" and letter.sender == ATTACKER
    assert update.update_id not in federation.checkpoint().applied_ids
    assert message_id not in marker.read_text()
    federation.assert_healthy(rss_before=rss, rss_bound=RSS_BOUND)


def _ready(federation: Federation) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(federation.node.url(ADMIN)))
    try:
        frame = connection.channel().queue_declare(updates_queue(TASK), passive=True)
        return int(frame.method.message_count)
    finally:
        connection.close()
