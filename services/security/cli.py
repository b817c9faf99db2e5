"""`fedmq keys`: make a trainer's Ed25519 key pair and print the line the operator registers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def register(subcommands: Any) -> None:
    """Add `fedmq keys` to the CLI."""
    parser = subcommands.add_parser(
        "keys",
        help="create a trainer's signing key pair",
        description=(
            "Write <out>/<trainer-id>.key (private, mode 0600: give it to the trainer as"
            " FEDMQ_SIGNING_KEY_FILE) and <out>/<trainer-id>.pub, and print the public key"
            " line for the aggregator's trainer keys (FEDMQ_TRAINER_KEYS)."
        ),
    )
    parser.add_argument("--trainer-id", required=True, help="the trainer's id, e.g. site-0")
    parser.add_argument("--out", type=Path, required=True, help="directory for the key files")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")
    parser.set_defaults(func=run_keys)


def run_keys(args: argparse.Namespace) -> int:
    """Create the key pair; refuse to overwrite one unless `--force`."""
    from services.common.signing import (
        KeyFormatError,
        generate_keypair,
        public_key_line,
        write_signing_key,
    )

    out: Path = args.out
    private = out / f"{args.trainer_id}{PRIVATE_SUFFIX}"
    public = out / f"{args.trainer_id}{PUBLIC_SUFFIX}"
    if private.exists() and not args.force:
        print(f"{private} exists: keep it, or pass --force to replace it", file=sys.stderr)
        return 1
    signing_key, public_key = generate_keypair()
    try:
        line = public_key_line(args.trainer_id, public_key)
    except KeyFormatError as error:
        print(str(error), file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    write_signing_key(private, signing_key)
    public.write_text(line + "\n")
    print(line)
    return 0
