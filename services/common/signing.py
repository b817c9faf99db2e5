"""Ed25519 signatures of model updates: keys, key files, signing and verifying.

A signature covers `schemas.signing_bytes(update)`: every field of the update (ids, base
version, `created_at`, the delta) except the signature itself, so neither the payload nor
the freshness of a signed update can be changed without the trainer's private key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from schemas import ModelUpdate, signing_bytes

KEY_BYTES = 32
"""Ed25519 private seeds and public keys are both 32 bytes."""
KEY_ALGORITHM = "ed25519"
"""The only algorithm a public key line may name."""
PRIVATE_KEY_MODE = 0o600
"""A private key file is readable by its owner only."""
_TRAINER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

UpdateSigner = Callable[[ModelUpdate], ModelUpdate]


class KeyFormatError(ValueError):
    """A key or key line that cannot be read; the message says where and why."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh (private seed, public key) pair, 32 bytes each."""
    key = SigningKey.generate()
    return bytes(key), bytes(key.verify_key)


def public_key_of(signing_key: bytes) -> bytes:
    """The public key that verifies signatures made with `signing_key`."""
    return bytes(_signing_key(signing_key).verify_key)


def sign_update(update: ModelUpdate, signing_key: bytes) -> ModelUpdate:
    """A copy of `update` carrying the Ed25519 signature of its canonical bytes."""
    signed = _signing_key(signing_key).sign(signing_bytes(update))
    return update.model_copy(update={"signature": signed.signature})


def verify_update(update: ModelUpdate, public_key: bytes) -> bool:
    """Whether `update.signature` was made over its canonical bytes by `public_key`'s owner."""
    if update.signature is None or len(public_key) != KEY_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(signing_bytes(update), update.signature)
    except BadSignatureError:
        return False
    return True


def update_signer(key_file: Path | None) -> UpdateSigner:
    """The trainer's hook: signs with the key in `key_file`, or changes nothing when None."""
    if key_file is None:
        return _unchanged
    key = load_signing_key(key_file)
    return lambda update: sign_update(update, key)


def _unchanged(update: ModelUpdate) -> ModelUpdate:
    return update


# -- key files ---------------------------------------------------------------------------


def load_signing_key(path: Path) -> bytes:
    """Read a private key file: the 32-byte seed in hex or base64 (whitespace ignored)."""
    text = "".join(path.read_text().split())
    try:
        return _decode_key(text)
    except KeyFormatError as error:
        raise KeyFormatError(f"{path}: {error}") from None


def write_signing_key(path: Path, signing_key: bytes) -> None:
    """Write the seed as base64, creating the file with mode 0600 (never world-readable)."""
    _signing_key(signing_key)  # refuse to write something that is not a key
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_KEY_MODE)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(base64.b64encode(signing_key).decode("ascii") + "\n")
    os.chmod(path, PRIVATE_KEY_MODE)  # O_CREAT's mode does not apply to an existing file


def public_key_line(trainer_id: str, public_key: bytes) -> str:
    """`<trainer_id> ed25519:<base64>`: what the operator adds to the aggregator's keys."""
    if not _TRAINER_ID.match(trainer_id):
        raise KeyFormatError(f"{trainer_id!r} is not a valid trainer id")
    if len(public_key) != KEY_BYTES:
        raise KeyFormatError(f"a public key is {KEY_BYTES} bytes, got {len(public_key)}")
    return f"{trainer_id} {KEY_ALGORITHM}:{base64.b64encode(public_key).decode('ascii')}"


def parse_public_key_line(line: str) -> tuple[str, bytes]:
    """`(trainer_id, public key)` from one line written by `public_key_line`."""
    fields = line.split()
    if len(fields) != 2:
        raise KeyFormatError(f"expected '<trainer_id> {KEY_ALGORITHM}:<base64>', got {line!r}")
    trainer_id, key = fields
    if not _TRAINER_ID.match(trainer_id):
        raise KeyFormatError(f"{trainer_id!r} is not a valid trainer id")
    algorithm, _, encoded = key.partition(":")
    if algorithm != KEY_ALGORITHM:
        raise KeyFormatError(f"key of {trainer_id!r} is not {KEY_ALGORITHM}")
    public_key = _b64(encoded)
    if public_key is None or len(public_key) != KEY_BYTES:
        raise KeyFormatError(f"key of {trainer_id!r} is not {KEY_BYTES} bytes of base64")
    return trainer_id, public_key


def _signing_key(seed: bytes) -> SigningKey:
    if len(seed) != KEY_BYTES:
        raise KeyFormatError(f"an Ed25519 private key is {KEY_BYTES} bytes, got {len(seed)}")
    return SigningKey(seed)


def _decode_key(text: str) -> bytes:
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass  # 64 characters of base64 is not a 32-byte key either; say so below
    key = _b64(text)
    if key is None or len(key) != KEY_BYTES:
        raise KeyFormatError(f"not a {KEY_BYTES}-byte Ed25519 private key in hex or base64")
    return key


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
