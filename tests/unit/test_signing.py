"""Ed25519 signatures of updates, key files, public key lines and `fedmq keys`."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import numpy as np
import pytest

from schemas import ModelUpdate, Tensor, decode, encode
from services.cli import main
from services.common.signing import (
    KeyFormatError,
    generate_keypair,
    load_signing_key,
    parse_public_key_line,
    public_key_line,
    public_key_of,
    sign_update,
    update_signer,
    verify_update,
    write_signing_key,
)


def _update(**fields: object) -> ModelUpdate:
    values: dict[str, object] = {
        "task_id": "t",
        "trainer_id": "site-0",
        "base_version": 3,
        "num_examples": 10,
        "delta": (Tensor.from_numpy("w", np.arange(4, dtype=np.float32)),),
        "created_at": 1_700_000_000.0,
    }
    values.update(fields)
    return ModelUpdate.model_validate(values)


def test_a_keypair_is_a_32_byte_seed_and_its_matching_public_key() -> None:
    private, public = generate_keypair()
    assert len(private) == 32 and len(public) == 32
    assert public_key_of(private) == public
    assert generate_keypair()[0] != private


def test_a_signed_update_verifies_with_the_signers_public_key() -> None:
    private, public = generate_keypair()
    signed = sign_update(_update(), private)
    assert signed.signature is not None and len(signed.signature) == 64
    assert verify_update(signed, public)


def test_signing_returns_a_copy_and_leaves_the_original_unsigned() -> None:
    private, _ = generate_keypair()
    original = _update()
    signed = sign_update(original, private)
    assert original.signature is None
    assert signed.model_copy(update={"signature": None}) == original


def test_a_signature_survives_the_wire_encoding() -> None:
    private, public = generate_keypair()
    received = decode(encode(sign_update(_update(), private)), accept=(ModelUpdate,))
    assert verify_update(received, public)


def test_an_unsigned_update_does_not_verify() -> None:
    _, public = generate_keypair()
    assert not verify_update(_update(), public)


def test_another_trainers_key_does_not_verify_the_signature() -> None:
    private, _ = generate_keypair()
    _, other_public = generate_keypair()
    assert not verify_update(sign_update(_update(), private), other_public)


@pytest.mark.parametrize(
    "change",
    [
        {"trainer_id": "site-1"},
        {"update_id": "another-id"},
        {"base_version": 4},
        {"num_examples": 11},
        {"created_at": 1_700_000_001.0},
        {"metrics": {"loss": 0.5}},
        {"delta": (Tensor.from_numpy("w", np.array([0, 1, 2, 3.5], np.float32)),)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_changing_any_signed_field_breaks_the_signature(change: dict[str, object]) -> None:
    private, public = generate_keypair()
    signed = sign_update(_update(), private)
    tampered = signed.model_copy(update=change)
    assert tampered.signature == signed.signature
    assert not verify_update(tampered, public)


def test_a_flipped_signature_bit_does_not_verify() -> None:
    private, public = generate_keypair()
    signed = sign_update(_update(), private)
    assert signed.signature is not None
    forged = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    assert not verify_update(signed.model_copy(update={"signature": forged}), public)


def test_a_public_key_of_the_wrong_length_verifies_nothing() -> None:
    private, public = generate_keypair()
    assert not verify_update(sign_update(_update(), private), public[:31])


def test_a_written_private_key_file_is_owner_only_and_loads_back(tmp_path: Path) -> None:
    private, _ = generate_keypair()
    path = tmp_path / "site-0.key"
    write_signing_key(path, private)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(path) == private


def test_rewriting_a_world_readable_key_file_makes_it_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "site-0.key"
    path.write_text("old")
    path.chmod(0o644)
    write_signing_key(path, generate_keypair()[0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_private_key_in_hex_loads_too(tmp_path: Path) -> None:
    private, _ = generate_keypair()
    path = tmp_path / "hex.key"
    path.write_text(private.hex().upper() + "\n")
    assert load_signing_key(path) == private


@pytest.mark.parametrize("text", ["", "not a key", base64.b64encode(b"x" * 31).decode(), "zz" * 32])
def test_a_key_file_that_holds_no_32_byte_key_is_refused_with_its_path(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(KeyFormatError, match=r"bad\.key"):
        load_signing_key(path)


def test_a_public_key_line_round_trips() -> None:
    _, public = generate_keypair()
    line = public_key_line("site-0", public)
    assert line.startswith("site-0 ed25519:")
    assert parse_public_key_line(line) == ("site-0", public)


@pytest.mark.parametrize(
    "line",
    [
        "site-0",
        "site-0 ed25519:AAAA",
        "site-0 rsa:" + base64.b64encode(b"k" * 32).decode(),
        "site/0 ed25519:" + base64.b64encode(b"k" * 32).decode(),
        "site-0 ed25519:" + base64.b64encode(b"k" * 32).decode() + " extra",
        "site-0 ed25519:!!notbase64!!",
    ],
)
def test_a_malformed_public_key_line_is_refused(line: str) -> None:
    with pytest.raises(KeyFormatError):
        parse_public_key_line(line)


def test_the_trainer_hook_signs_with_the_key_file(tmp_path: Path) -> None:
    private, public = generate_keypair()
    path = tmp_path / "site-0.key"
    write_signing_key(path, private)
    sign = update_signer(path)
    assert verify_update(sign(_update()), public)


def test_the_trainer_hook_without_a_key_file_leaves_updates_unsigned() -> None:
    update = _update()
    assert update_signer(None)(update) is update


def test_fedmq_keys_writes_a_key_pair_and_prints_its_public_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # When the operator runs `fedmq keys`
    code = main(["keys", "--trainer-id", "site-0", "--out", str(tmp_path / "keys")])
    # Then the printed line is the .pub file and verifies what the .key file signs
    printed = capsys.readouterr().out.strip()
    assert code == 0
    assert (tmp_path / "keys" / "site-0.pub").read_text().strip() == printed
    trainer_id, public = parse_public_key_line(printed)
    private = load_signing_key(tmp_path / "keys" / "site-0.key")
    assert trainer_id == "site-0"
    assert verify_update(sign_update(_update(), private), public)
    assert stat.S_IMODE((tmp_path / "keys" / "site-0.key").stat().st_mode) == 0o600


def test_fedmq_keys_refuses_to_overwrite_a_key_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "--trainer-id", "site-0", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "site-0.key").read_bytes()
    assert main(["keys", "--trainer-id", "site-0", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "site-0.key").read_bytes() == first
    assert main(["keys", "--trainer-id", "site-0", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "site-0.key").read_bytes() != first
    assert "exists" in capsys.readouterr().err
