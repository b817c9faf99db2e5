"""Who sent an update: key registry (file, dir, live reload) and the sender checks in order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from schemas import ModelUpdate, Tensor
from services.aggregator.identity import (
    DEFAULT_REPLAY_WINDOW_S,
    KEY_RELOAD_CHECK_S,
    SenderCheck,
    TrainerKeyRegistry,
    broker_login,
    sender_check,
)
from services.aggregator.validation import RejectedUpdate
from services.common.signing import KeyFormatError, generate_keypair, public_key_line, sign_update

NOW = 1_700_000_000.0
SITE_KEY, SITE_PUBLIC = generate_keypair()
OTHER_KEY, OTHER_PUBLIC = generate_keypair()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class DictKeys:
    def __init__(self, keys: dict[str, tuple[bytes, ...]]) -> None:
        self.keys = keys

    def keys_for(self, trainer_id: str) -> tuple[bytes, ...]:
        return self.keys.get(trainer_id, ())


def _update(*, trainer_id: str = "site-0", created_at: float = NOW) -> ModelUpdate:
    return ModelUpdate(
        task_id="t",
        trainer_id=trainer_id,
        base_version=0,
        num_examples=10,
        delta=(Tensor.from_numpy("w", np.ones(3, np.float32)),),
        created_at=created_at,
    )


def _signed(*, created_at: float = NOW) -> ModelUpdate:
    return sign_update(_update(created_at=created_at), SITE_KEY)


def _registered(
    *, require_user_id_match: bool = False, replay_window_s: float = DEFAULT_REPLAY_WINDOW_S
) -> SenderCheck:
    return SenderCheck(
        keys=DictKeys({"site-0": (SITE_PUBLIC,)}),
        service_login="guest",
        require_user_id_match=require_user_id_match,
        replay_window_s=replay_window_s,
    )


def _reason(
    check: SenderCheck,
    update: ModelUpdate,
    *,
    user_id: str | None = None,
    now: float = NOW,
    redelivered: bool = False,
) -> str:
    with pytest.raises(RejectedUpdate) as caught:
        check.check(update, user_id=user_id, now=now, redelivered=redelivered)
    return caught.value.reason


def _passes(
    check: SenderCheck,
    update: ModelUpdate,
    *,
    user_id: str | None = None,
    redelivered: bool = False,
) -> bool:
    check.check(update, user_id=user_id, now=NOW, redelivered=redelivered)
    return True


# -- the registry ------------------------------------------------------------------------


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_keys_file_maps_each_trainer_to_its_public_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "trainers",
        "# hospital keys",
        public_key_line("site-0", SITE_PUBLIC),
        "",
        public_key_line("site-1", OTHER_PUBLIC) + "  # added in May",
    )
    registry = TrainerKeyRegistry(path)
    assert registry.keys_for("site-0") == (SITE_PUBLIC,)
    assert registry.keys_for("site-1") == (OTHER_PUBLIC,)
    assert registry.keys_for("site-2") == ()
    assert len(registry) == 2


def test_a_trainer_listed_twice_has_both_keys_during_a_rotation(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "trainers",
        public_key_line("site-0", SITE_PUBLIC),
        public_key_line("site-0", OTHER_PUBLIC),
    )
    assert TrainerKeyRegistry(path).keys_for("site-0") == (SITE_PUBLIC, OTHER_PUBLIC)


def test_a_keys_directory_reads_only_its_pub_files(tmp_path: Path) -> None:
    _write(tmp_path / "site-0.pub", public_key_line("site-0", SITE_PUBLIC))
    _write(tmp_path / "site-1.key", public_key_line("site-1", OTHER_PUBLIC))
    registry = TrainerKeyRegistry(tmp_path)
    assert registry.keys_for("site-0") == (SITE_PUBLIC,)
    assert registry.keys_for("site-1") == ()


def test_a_malformed_line_is_refused_at_startup_naming_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "trainers", public_key_line("site-0", SITE_PUBLIC), "site-1 oops")
    with pytest.raises(KeyFormatError, match=r"trainers:2"):
        TrainerKeyRegistry(path)


def test_a_missing_keys_file_is_refused_at_startup(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TrainerKeyRegistry(tmp_path / "absent")


def test_an_added_key_is_picked_up_after_the_check_interval_without_restart(
    tmp_path: Path,
) -> None:
    # Given a registry that knows site-0 only
    clock = FakeClock()
    path = _write(tmp_path / "trainers", public_key_line("site-0", SITE_PUBLIC))
    registry = TrainerKeyRegistry(path, clock=clock)
    # When the operator adds site-1
    _write(path, public_key_line("site-0", SITE_PUBLIC), public_key_line("site-1", OTHER_PUBLIC))
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 1_000_000))
    # Then it is unknown until the check interval passed, known afterwards
    clock.now = KEY_RELOAD_CHECK_S / 2
    assert registry.keys_for("site-1") == ()
    clock.now = KEY_RELOAD_CHECK_S
    assert registry.keys_for("site-1") == (OTHER_PUBLIC,)


def test_a_removed_pub_file_revokes_its_trainer(tmp_path: Path) -> None:
    clock = FakeClock()
    _write(tmp_path / "site-0.pub", public_key_line("site-0", SITE_PUBLIC))
    _write(tmp_path / "site-1.pub", public_key_line("site-1", OTHER_PUBLIC))
    registry = TrainerKeyRegistry(tmp_path, clock=clock)
    assert registry.keys_for("site-1") == (OTHER_PUBLIC,)
    (tmp_path / "site-1.pub").unlink()
    clock.now = KEY_RELOAD_CHECK_S
    assert registry.keys_for("site-1") == ()
    assert registry.keys_for("site-0") == (SITE_PUBLIC,)


def test_an_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    clock = FakeClock()
    path = _write(tmp_path / "trainers", public_key_line("site-0", SITE_PUBLIC))
    registry = TrainerKeyRegistry(path, clock=clock)
    clock.now = 10 * KEY_RELOAD_CHECK_S
    assert registry.reload_if_changed() is False


def test_a_broken_edit_keeps_the_previous_keys(tmp_path: Path) -> None:
    clock = FakeClock()
    path = _write(tmp_path / "trainers", public_key_line("site-0", SITE_PUBLIC))
    registry = TrainerKeyRegistry(path, clock=clock)
    _write(path, "site-0 ed25519:half-writ")
    clock.now = KEY_RELOAD_CHECK_S
    assert registry.reload_if_changed() is False
    assert registry.keys_for("site-0") == (SITE_PUBLIC,)


# -- the checks, in order -----------------------------------------------------------------


def test_a_signed_fresh_update_from_a_registered_trainer_passes() -> None:
    assert _passes(_registered(), _signed(), user_id="site-0")


def test_a_trainer_without_a_registered_key_is_unknown() -> None:
    update = sign_update(_update(trainer_id="site-9"), SITE_KEY)
    assert _reason(_registered(), update) == "unknown-trainer"


def test_signatures_required_without_any_keys_makes_every_trainer_unknown() -> None:
    check = SenderCheck(keys=None, signatures_required=True)
    assert _reason(check, _signed()) == "unknown-trainer"


def test_a_login_naming_another_trainer_is_an_identity_mismatch() -> None:
    assert _reason(_registered(), _signed(), user_id="site-1") == "identity-mismatch"


def test_the_shared_service_login_vouches_for_nobody_but_passes_when_not_required() -> None:
    assert _passes(_registered(), _signed(), user_id="guest")


def test_the_shared_service_login_is_a_mismatch_when_logins_must_match() -> None:
    check = _registered(require_user_id_match=True)
    assert _reason(check, _signed(), user_id="guest") == "identity-mismatch"


def test_a_missing_user_id_is_a_mismatch_when_logins_must_match() -> None:
    check = _registered(require_user_id_match=True)
    assert _reason(check, _signed(), user_id=None) == "identity-mismatch"
    assert _passes(check, _signed(), user_id="site-0")


def test_a_missing_signature_is_a_bad_signature() -> None:
    assert _reason(_registered(), _update()) == "bad-signature"


def test_a_signature_by_another_key_is_a_bad_signature() -> None:
    forged = sign_update(_update(), OTHER_KEY)
    assert _reason(_registered(), forged) == "bad-signature"


def test_any_of_a_rotating_trainers_keys_verifies() -> None:
    check = SenderCheck(keys=DictKeys({"site-0": (OTHER_PUBLIC, SITE_PUBLIC)}))
    assert _passes(check, _signed())


def test_without_registered_keys_signatures_are_not_checked() -> None:
    assert _passes(SenderCheck(), _update())


def test_an_update_created_an_hour_ago_is_a_replay() -> None:
    assert _reason(_registered(), _signed(created_at=NOW - 3600)) == "replay"


def test_an_update_from_the_future_beyond_the_window_is_a_replay() -> None:
    assert _reason(_registered(), _signed(created_at=NOW + 601)) == "replay"


def test_an_update_just_inside_the_window_is_fresh() -> None:
    assert _passes(_registered(), _signed(created_at=NOW - 599))


def test_the_replay_window_is_configurable() -> None:
    check = _registered(replay_window_s=30.0)
    assert _reason(check, _signed(created_at=NOW - 31)) == "replay"


def test_a_broker_redelivery_of_an_old_update_is_not_a_replay() -> None:
    assert _passes(_registered(), _signed(created_at=NOW - 3600), redelivered=True)


def test_checks_run_in_order_unknown_then_mismatch_then_signature_then_replay() -> None:
    check = _registered()
    # everything wrong: unknown wins
    stranger = _update(trainer_id="site-9", created_at=NOW - 3600)
    assert _reason(check, stranger, user_id="site-1") == "unknown-trainer"
    # known trainer, wrong login, unsigned and old: mismatch wins
    old_unsigned = _update(created_at=NOW - 3600)
    assert _reason(check, old_unsigned, user_id="site-1") == "identity-mismatch"
    # right login, unsigned and old: bad signature wins
    assert _reason(check, old_unsigned, user_id="site-0") == "bad-signature"


def test_the_policy_from_settings_refuses_required_signatures_without_keys() -> None:
    with pytest.raises(ValueError, match="trainers' public keys"):
        sender_check(
            trainer_keys=None,
            signatures_required=True,
            require_user_id_match=False,
            amqp_url="amqp://guest:guest@localhost:5672/%2F",
        )


def test_the_policy_from_settings_exempts_the_aggregators_own_login(tmp_path: Path) -> None:
    path = _write(tmp_path / "trainers", public_key_line("site-0", SITE_PUBLIC))
    check = sender_check(
        trainer_keys=path,
        signatures_required=False,
        require_user_id_match=False,
        amqp_url="amqp://fedmq%2Dagg:secret@broker:5672/%2F",
        replay_window_s=60.0,
    )
    assert check.service_login == "fedmq-agg"
    assert check.replay_window_s == 60.0
    assert _passes(check, _signed(), user_id="fedmq-agg")
    assert _reason(check, _signed(), user_id="guest") == "identity-mismatch"


def test_a_certificate_login_url_has_no_login() -> None:
    assert broker_login("amqps://broker:5671/%2F") is None
    assert broker_login("amqp://site-0:pw@broker/%2F") == "site-0"
