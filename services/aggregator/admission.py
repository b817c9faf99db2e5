"""What the aggregator checks on a delivery before decoding its body, and the decode bounds.

Decoding is the expensive, attackable step, so everything the AMQP properties can tell is
checked first: a poison redelivery (services/aggregator/poison.py), and with per-site
logins, that the broker-verified `user_id` is the sender the routing key names. The body
is then decoded within bounds sized from the task's model (schemas/limits.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from schemas import DecodeLimits
from services.aggregator.layout import ParamLayout
from services.aggregator.poison import POISON_REASON, PoisonGuard
from services.aggregator.validation import RejectReason
from services.common.bus import Delivery


@dataclass(frozen=True)
class Refusal:
    """Why a delivery is dead-lettered without its body being decoded."""

    reason: str
    detail: str


def update_limits(layout: ParamLayout, *, max_message_bytes: int | None) -> DecodeLimits:
    """Decode bounds for updates of `layout`'s model; `max_message_bytes` may only lower them."""
    limits = DecodeLimits.for_model(
        tensors=max(1, len(layout.float_names)), float_elements=max(1, layout.size)
    )
    if max_message_bytes is not None and max_message_bytes < limits.max_bytes:
        limits = replace(limits, max_bytes=max_message_bytes)
    return limits


class Admission:
    """The checks made on an update's properties, before its body is touched."""

    def __init__(self, *, poison: PoisonGuard, require_user_id_match: bool) -> None:
        self._poison = poison
        self._require_user_id_match = require_user_id_match

    @property
    def poison(self) -> PoisonGuard:
        """The in-flight marker to hold while an admitted update is handled."""
        return self._poison

    def refuse(self, delivery: Delivery) -> Refusal | None:
        """A reason to dead-letter `delivery` unread, or None to go on and decode it."""
        verdict = self._poison.verdict(delivery)
        if verdict is not None:
            return Refusal(POISON_REASON, verdict)
        if not self._require_user_id_match:
            return None
        user_id = delivery.properties.user_id
        named = delivery.routing_key.rsplit(".", 1)[-1]
        if user_id is None or user_id != named:
            login = "no user_id" if user_id is None else f"broker login {user_id!r}"
            return Refusal(
                RejectReason.IDENTITY_MISMATCH,
                f"routing key {delivery.routing_key!r} names sender {named!r}"
                f" but the message was published with {login}",
            )
        return None
