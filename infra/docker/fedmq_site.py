#!/usr/bin/env python3
"""Give one replica of a scaled trainer its site identity, then exec `fedmq <args>`.

`docker compose up --scale trainer=N` and a Kubernetes StatefulSet start N copies of
one container spec; each must still train on its own part of the data under its own
broker login. This entrypoint derives, for a replica that was not told explicitly:

- `FEDMQ_SITE_INDEX`: a StatefulSet pod's ordinal (hostname `trainer-3` -> 3), or a
  compose replica's number minus one (its container name `<project>-trainer-4`, found by
  reverse DNS of its own address on the compose network -> 3);
- `FEDMQ_TRAINER_ID`: `$SITE_TRAINER_PREFIX<index>` (default `trainer-site-<index>`),
  which is also the replica's broker user;
- `FEDMQ_AMQP_URL`: `$SITE_AMQP_URL_TEMPLATE` with `{user}` and `{password}` filled in,
  the password read from `$SITE_PASSWORD_DIR/<trainer id>` (a mounted Secret).

Values already set in the environment win. The `SITE_*` variables configure this
entrypoint only; fedmq's own settings keep the `FEDMQ_` prefix.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

DEFAULT_TRAINER_PREFIX = "trainer-site-"
STATEFULSET_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?-(?P<ordinal>[0-9]+)$")
"""A StatefulSet pod is named `<set>-<ordinal>` (0-based) and that is its hostname."""
COMPOSE_CONTAINER = re.compile(r"^(?P<project>.+?)[-_](?P<service>[^-_.]+)[-_](?P<number>[0-9]+)$")
"""Compose names replicas `<project>-<service>-<n>` (v2; `_` in v1), `n` from 1."""


class SiteIdentityError(RuntimeError):
    """The replica's identity could not be derived; set `FEDMQ_SITE_INDEX` explicitly."""


def site_index(hostname: str, reverse_name: Callable[[], str | None]) -> int:
    """The 0-based site index of this replica, from its hostname or its compose name."""
    match = STATEFULSET_HOSTNAME.match(hostname)
    if match is not None:
        return int(match["ordinal"])
    name = reverse_name()
    if name:
        container = name.rstrip(".").split(".", 1)[0]
        compose = COMPOSE_CONTAINER.match(container)
        if compose is not None and int(compose["number"]) >= 1:
            return int(compose["number"]) - 1
    raise SiteIdentityError(
        f"cannot derive a site index from hostname {hostname!r} or DNS name {name!r}: "
        "set FEDMQ_SITE_INDEX (and FEDMQ_TRAINER_ID) for this container"
    )


def resolve(
    env: Mapping[str, str],
    *,
    hostname: str,
    reverse_name: Callable[[], str | None],
    read_password: Callable[[str], str],
) -> dict[str, str]:
    """The `FEDMQ_*` variables to add so that this replica knows who it is."""
    resolved: dict[str, str] = {}
    index_text = env.get("FEDMQ_SITE_INDEX", "").strip()
    index = int(index_text) if index_text else site_index(hostname, reverse_name)
    resolved["FEDMQ_SITE_INDEX"] = str(index)
    trainer_id = env.get("FEDMQ_TRAINER_ID", "").strip()
    if not trainer_id:
        trainer_id = f"{env.get('SITE_TRAINER_PREFIX', DEFAULT_TRAINER_PREFIX)}{index}"
        resolved["FEDMQ_TRAINER_ID"] = trainer_id
    template = env.get("SITE_AMQP_URL_TEMPLATE", "").strip()
    if not env.get("FEDMQ_AMQP_URL") and template:
        password = urllib.parse.quote(read_password(trainer_id), safe="")
        user = urllib.parse.quote(trainer_id, safe="")
        resolved["FEDMQ_AMQP_URL"] = template.format(user=user, password=password)
    return resolved


def _reverse_name() -> str | None:
    try:
        address = socket.gethostbyname(socket.gethostname())
        return socket.gethostbyaddr(address)[0]
    except OSError:
        return None


def _password_reader(env: Mapping[str, str]) -> Callable[[str], str]:
    def read(user: str) -> str:
        folder = env.get("SITE_PASSWORD_DIR", "").strip()
        if not folder:
            raise SiteIdentityError("SITE_AMQP_URL_TEMPLATE needs SITE_PASSWORD_DIR")
        path = Path(folder) / user
        if not path.is_file():
            raise SiteIdentityError(
                f"no password for broker user {user!r} at {path}: is that user provisioned? "
                "(scaling beyond the provisioned trainers needs new users, see docs/operations.md)"
            )
        return path.read_text().strip()

    return read


def main(argv: list[str]) -> int:
    """Resolve the identity, then replace this process with `fedmq <argv>`."""
    try:
        resolved = resolve(
            os.environ,
            hostname=socket.gethostname(),
            reverse_name=_reverse_name,
            read_password=_password_reader(os.environ),
        )
    except (SiteIdentityError, ValueError) as error:
        print(f"fedmq-site: {error}", file=sys.stderr)
        return 2
    os.environ.update(resolved)
    shown = {k: v for k, v in resolved.items() if k != "FEDMQ_AMQP_URL"}
    print(f"fedmq-site: {shown}", file=sys.stderr)
    os.execvp("fedmq", ["fedmq", *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
