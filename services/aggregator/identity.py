"""Who sent an update: registered trainer keys, the broker-vouched login, signatures, freshness.

`SenderCheck.check` runs before the core sees an update and raises `RejectedUpdate` with
`unknown-trainer`, `identity-mismatch`, `bad-signature` or `replay`, in that order. A
re-sent `update_id` is refused later by the core (`duplicate`), whose memory of applied
ids is checkpointed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import structlog

from schemas import ModelUpdate
from services.aggregator.validation import RejectedUpdate, RejectReason
from services.common.signing import KeyFormatError, parse_public_key_line, verify_update

log = structlog.get_logger(__name__)

KEY_RELOAD_CHECK_S = 2.0
"""How often (at most) the keys file or directory is looked at for changes."""
DEFAULT_REPLAY_WINDOW_S = 600.0
"""An update created more than this many seconds before (or after) its arrival is refused."""
PUBLIC_KEY_SUFFIX = ".pub"
"""In a keys directory, only files with this suffix are read."""

Stamp = tuple[tuple[str, int, int, int], ...]
"""What identifies one version of the keys on disk: (name, inode, size, mtime) per file."""


class KeyLookup(Protocol):
    """Where the public keys of the registered trainers come from."""

    def keys_for(self, trainer_id: str) -> tuple[bytes, ...]:
        """The public keys registered for `trainer_id`; empty when it is unknown."""
        ...


class TrainerKeyRegistry:
    """Public keys from one file of `<trainer_id> ed25519:<base64>` lines or a dir of `*.pub`.

    Blank lines and `#` comments are ignored; a trainer may have several lines (key
    rotation: any of its keys verifies). The keys are re-read, without a restart, when a
    file's mtime, size or inode changes; at most every `check_interval` seconds. A reload
    that fails (a half-written or missing file) keeps the previous keys and logs why.
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = KEY_RELOAD_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._check_interval = check_interval
        self._clock = clock
        self._stamp = _stamp(path)
        self._keys = _read_keys(path)
        self._checked_at = clock()

    def keys_for(self, trainer_id: str) -> tuple[bytes, ...]:
        """The public keys of `trainer_id` (reloading first when the files changed)."""
        self.reload_if_changed()
        return self._keys.get(trainer_id, ())

    def __len__(self) -> int:
        return len(self._keys)

    def reload_if_changed(self) -> bool:
        """Re-read the keys if due and changed on disk; True when new keys were loaded."""
        now = self._clock()
        if now - self._checked_at < self._check_interval:
            return False
        self._checked_at = now
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return False
            keys = _read_keys(self.path)
        except (OSError, KeyFormatError) as error:
            log.warning("trainer_keys_not_reloaded", path=str(self.path), error=str(error))
            return False
        self._stamp, self._keys = stamp, keys
        log.info("trainer_keys_reloaded", path=str(self.path), trainers=len(keys))
        return True


@dataclass(frozen=True)
class SenderCheck:
    """The identity policy of one aggregator (pure apart from the key lookup).

    `user_id` is the AMQP property RabbitMQ verifies against the publisher's login. With
    `require_user_id_match`, it must be present and equal the update's `trainer_id`: each
    trainer has its own broker user. Without it, a `user_id` that names another trainer
    is still refused, but one equal to `service_login` (the aggregator's own login, e.g.
    `guest` on a development broker where every process shares it) vouches for nobody
    and is let through: signatures are then what authenticates the sender.
    """

    keys: KeyLookup | None = None
    signatures_required: bool = False
    require_user_id_match: bool = False
    service_login: str | None = None
    replay_window_s: float = DEFAULT_REPLAY_WINDOW_S

    def check(
        self, update: ModelUpdate, *, user_id: str | None, now: float, redelivered: bool
    ) -> None:
        """Raise `RejectedUpdate` unless the update comes, signed and fresh, from its trainer.

        Freshness is not checked on a broker redelivery (the broker sets that flag, a
        sender cannot): an update admitted before a crash must still be taken back.
        """
        keys = self._known_keys(update)
        self._check_login(update, user_id)
        if keys is not None and not any(verify_update(update, key) for key in keys):
            state = "a signature that does not verify" if update.signature else "no signature"
            raise RejectedUpdate(
                RejectReason.BAD_SIGNATURE,
                f"update {update.update_id} from {update.trainer_id!r} has {state}",
            )
        if not redelivered:
            self._check_fresh(update, now)

    def _known_keys(self, update: ModelUpdate) -> tuple[bytes, ...] | None:
        if self.keys is None and not self.signatures_required:
            return None
        keys = self.keys.keys_for(update.trainer_id) if self.keys is not None else ()
        if not keys:
            raise RejectedUpdate(
                RejectReason.UNKNOWN_TRAINER,
                f"trainer {update.trainer_id!r} has no registered public key",
            )
        return keys

    def _check_login(self, update: ModelUpdate, user_id: str | None) -> None:
        self.check_claim(update.trainer_id, user_id=user_id, what="update")

    def check_claim(self, claimed: str, *, user_id: str | None, what: str) -> None:
        """`RejectedUpdate` unless a message claiming to come from `claimed` may be its.

        The same rule for updates, joins, heartbeats and departures: with per-site logins
        (`require_user_id_match`) the broker-verified `user_id` must be the claimed id.
        """
        if user_id == claimed:
            return
        if not self.require_user_id_match and user_id in (None, self.service_login):
            return
        login = "no user_id" if user_id is None else f"broker login {user_id!r}"
        raise RejectedUpdate(
            RejectReason.IDENTITY_MISMATCH,
            f"{what} claims sender {claimed!r} but was published with {login}",
        )

    def _check_fresh(self, update: ModelUpdate, now: float) -> None:
        age = now - update.created_at
        if abs(age) > self.replay_window_s:
            raise RejectedUpdate(
                RejectReason.REPLAY,
                f"update {update.update_id} was created {age:.0f}s before its arrival"
                f" (window ±{self.replay_window_s:.0f}s)",
            )


def sender_check(
    *,
    trainer_keys: Path | None,
    signatures_required: bool,
    require_user_id_match: bool,
    amqp_url: str,
    replay_window_s: float = DEFAULT_REPLAY_WINDOW_S,
) -> SenderCheck:
    """The policy the settings describe; ValueError when signatures are required but no keys."""
    if signatures_required and trainer_keys is None:
        raise ValueError(
            "the task requires signatures: give the aggregator the trainers' public keys"
            " (FEDMQ_TRAINER_KEYS or --trainer-keys)"
        )
    return SenderCheck(
        keys=None if trainer_keys is None else TrainerKeyRegistry(trainer_keys),
        signatures_required=signatures_required,
        require_user_id_match=require_user_id_match,
        service_login=broker_login(amqp_url),
        replay_window_s=replay_window_s,
    )


def broker_login(amqp_url: str) -> str | None:
    """The user name in a broker URL (None for a certificate login)."""
    username = urlsplit(amqp_url).username
    return unquote(username) if username else None


def _read_keys(path: Path) -> dict[str, tuple[bytes, ...]]:
    keys: dict[str, tuple[bytes, ...]] = {}
    for source in _key_files(path):
        for number, raw in enumerate(source.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                trainer_id, key = parse_public_key_line(line)
            except KeyFormatError as error:
                raise KeyFormatError(f"{source}:{number}: {error}") from None
            keys[trainer_id] = (*keys.get(trainer_id, ()), key)
    return keys


def _key_files(path: Path) -> Iterator[Path]:
    if not path.is_dir():
        yield path  # a missing file raises when read: an operator's typo must not pass
        return
    yield from sorted(p for p in path.iterdir() if p.suffix == PUBLIC_KEY_SUFFIX and p.is_file())


def _stamp(path: Path) -> Stamp:
    files = [path, *_key_files(path)] if path.is_dir() else [path]
    stamps = []
    for file in files:
        status = file.stat()
        stamps.append((file.name, status.st_ino, status.st_size, status.st_mtime_ns))
    return tuple(stamps)
