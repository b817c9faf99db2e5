"""A message in hand when the aggregator died is refused on redelivery; others pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.aggregator.identity import SenderCheck
from services.aggregator.poison import MARKER_NAME, MAX_DELIVERIES, PoisonGuard
from services.aggregator.validation import RejectedUpdate
from services.common.bus import Delivery, MessageProperties


def _delivery(
    body: bytes, *, redelivered: bool, headers: dict[str, object] | None = None
) -> Delivery:
    return Delivery(
        body=body,
        properties=MessageProperties(message_id="m-1", headers=headers or {}),
        exchange="fedmq.updates",
        routing_key="update.t.site-a",
        redelivered=redelivered,
    )


def _die_handling(guard: PoisonGuard, delivery: Delivery) -> object:
    """Enter `handling` and never leave, as a process that dies inside; keep the result
    alive (a collected context manager would run its cleanup)."""
    handling = guard.handling(delivery)
    handling.__enter__()
    return handling


def test_given_one_crash_while_handling_when_it_comes_back_then_it_is_tried_again(
    tmp_path: Path,
) -> None:
    # Given a process killed while an update was in hand (an operator's kill, a reboot)
    update = _delivery(b"\x80" * 100, redelivered=False)
    dead = _die_handling(PoisonGuard(tmp_path), update)
    assert (tmp_path / MARKER_NAME).read_text().startswith("m-1:100:")
    # When the next process starts and the broker redelivers it
    restarted = PoisonGuard(tmp_path)
    redelivered = _delivery(b"\x80" * 100, redelivered=True)
    # Then it is handled again (a valid update is not lost), and forgotten once it survives
    assert restarted.verdict(redelivered) is None
    with restarted.handling(redelivered):
        pass
    assert PoisonGuard(tmp_path).verdict(redelivered) is None
    del dead


def test_given_two_crashes_in_a_row_on_one_message_then_it_is_refused_once(
    tmp_path: Path,
) -> None:
    # Given a message in hand when the process died, twice in a row
    bomb = _delivery(b"\x80" * 100, redelivered=False)
    first_death = _die_handling(PoisonGuard(tmp_path), bomb)
    second = PoisonGuard(tmp_path)
    redelivered = _delivery(b"\x80" * 100, redelivered=True)
    assert second.verdict(redelivered) is None
    second_death = _die_handling(second, redelivered)
    # When the third process starts and the broker redelivers it
    third = PoisonGuard(tmp_path)
    # Then that message, and only it, is refused, once
    assert third.verdict(_delivery(b"\x80" * 99, redelivered=True)) is None
    assert third.verdict(redelivered) is not None
    assert third.verdict(redelivered) is None
    assert (tmp_path / MARKER_NAME).read_text().strip() == ""
    del first_death, second_death


def test_a_message_handled_to_the_end_leaves_no_marker(tmp_path: Path) -> None:
    guard = PoisonGuard(tmp_path)
    with guard.handling(_delivery(b"ok", redelivered=False)):
        pass
    assert PoisonGuard(tmp_path).verdict(_delivery(b"ok", redelivered=True)) is None


@pytest.mark.parametrize(
    ("count", "refused"), [(1, False), (MAX_DELIVERIES - 1, False), (MAX_DELIVERIES, True)]
)
def test_a_quorum_delivery_count_at_the_limit_is_poison(
    tmp_path: Path, count: int, refused: bool
) -> None:
    delivery = _delivery(b"x", redelivered=True, headers={"x-delivery-count": count})
    assert (PoisonGuard(tmp_path).verdict(delivery) is not None) is refused


def test_with_per_site_logins_a_claim_must_be_the_verified_login() -> None:
    check = SenderCheck(require_user_id_match=True, service_login="aggregator")
    check.check_claim("trainer-site-1", user_id="trainer-site-1", what="heartbeat")
    for user_id in (None, "trainer-site-2", "aggregator"):
        with pytest.raises(RejectedUpdate, match="claims sender 'trainer-site-1'"):
            check.check_claim("trainer-site-1", user_id=user_id, what="heartbeat")


def test_with_a_shared_login_a_claim_is_taken_unless_another_login_is_named() -> None:
    check = SenderCheck(require_user_id_match=False, service_login="guest")
    check.check_claim("site-a", user_id="guest", what="trainer_left")
    check.check_claim("site-a", user_id=None, what="trainer_left")
    with pytest.raises(RejectedUpdate):
        check.check_claim("site-a", user_id="site-b", what="trainer_left")
