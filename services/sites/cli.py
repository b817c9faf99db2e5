"""`fedmq site add|list|remove`: provision a remote site (a hospital) in one command."""

from __future__ import annotations

import argparse
import os
import secrets
import urllib.parse
from pathlib import Path
from typing import Any, Final

SITES_DIR: Final = Path("sites")
DEFAULT_KEYS_DIR: Final = SITES_DIR / "trainer-keys"
DEFAULT_DATA_FOLDER: Final = Path("/srv/fedmq/images")
PASSWORD_BYTES: Final = 24


def register(subcommands: Any) -> None:
    """Add `fedmq site` and its three actions to the CLI."""
    site = subcommands.add_parser(
        "site",
        help="add, list or remove a remote site (broker user, signing key, startup kit)",
        description="Provision a hospital: its broker user with least privilege, its Ed25519 "
        "key pair and a startup kit folder. Runs as the operator: --amqp-url (or "
        "FEDMQ_AMQP_URL) is an administrator's login, also used for the management API.",
    )
    actions = site.add_subparsers(dest="site_action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create a site's user, key pair and startup kit")
    add.add_argument("name", help="the site's id: its broker user and trainer id")
    add.add_argument("--task-id", help="task the site joins (default: env FEDMQ_TASK_ID)")
    add.add_argument("--out", type=Path, help="kit folder (default: sites/NAME)")
    add.add_argument(
        "--data-folder",
        type=Path,
        default=DEFAULT_DATA_FOLDER,
        help="where the site keeps its images, <class>/<image> (default: %(default)s)",
    )
    add.add_argument(
        "--broker-host",
        help="host[:port] the site reaches the broker at (default: the host of --amqp-url)",
    )
    add.add_argument("--image", default="fedmq:dev", help="trainer image (default: %(default)s)")
    add.add_argument("--ca-file", type=Path, help="CA certificate for amqps (env FEDMQ_CA_FILE)")
    add.add_argument("--force", action="store_true", help="replace an existing kit folder")
    for action in (add, actions.add_parser("list", help="list the sites"), _remove(actions)):
        _add_access_flags(action)
    site.set_defaults(func=run_site)


def _remove(actions: Any) -> argparse.ArgumentParser:
    remove: argparse.ArgumentParser = actions.add_parser(
        "remove", help="delete a site's broker user and unregister its key"
    )
    remove.add_argument("name", help="the site's id")
    return remove


def _add_access_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys-dir",
        type=Path,
        help="trainer keys folder the aggregator reads (--trainer-keys; default: "
        "env FEDMQ_TRAINER_KEYS, else sites/trainer-keys)",
    )
    parser.add_argument(
        "--management-url",
        help="management API (default: http://<broker host>:15672)",
    )
    parser.add_argument(
        "--definitions",
        type=Path,
        help="without API access: change this definitions file instead (then import it "
        "with rabbitmqctl import_definitions)",
    )


def run_site(args: argparse.Namespace) -> int:
    """Dispatch `add`, `list` or `remove`."""
    from services.common.settings import ServiceSettings

    settings = ServiceSettings()
    if args.site_action == "add":
        return _add(args, settings)
    if args.site_action == "remove":
        return _remove_site(args, settings)
    return _list(args, settings)


def _add(args: argparse.Namespace, settings: Any) -> int:
    from services.common.errors import UsageError
    from services.common.signing import generate_keypair, public_key_line
    from services.common.topology import validate_id
    from services.sites import access
    from services.sites.kit import Kit, write_kit

    try:
        name = validate_id(args.name, what="site name")
    except ValueError as error:
        raise UsageError(str(error)) from error
    task_id = args.task_id or settings.task_id
    out: Path = args.out or SITES_DIR / name
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} exists", hint="remove the site first, or pass --force")
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    vhost = _vhost(settings.amqp_url)
    if args.definitions is not None:
        access.grant_in_definitions(
            args.definitions, vhost=vhost, site=name, task_id=task_id, password=password
        )
    else:
        access.grant_with_api(
            _api(args, settings), vhost=vhost, site=name, task_id=task_id, password=password
        )
    signing_key, public_key = generate_keypair()
    line = public_key_line(name, public_key)
    keys_dir = _keys_dir(args)
    keys_dir.mkdir(parents=True, exist_ok=True)
    (keys_dir / f"{name}.pub").write_text(line + "\n")
    ca_file = args.ca_file or settings.ca_file
    kit = Kit(
        site=name,
        task_id=task_id,
        site_url=_site_url(settings.amqp_url, name, password, args.broker_host),
        signing_key=signing_key,
        public_line=line,
        data_folder=args.data_folder,
        ca_file=ca_file if settings.amqp_url.startswith("amqps") else None,
        image=args.image,
    )
    write_kit(kit, out)
    where = args.definitions or "the broker"
    print(f"site {name}: user and permissions on {where}, key registered in {keys_dir}")
    print(f"startup kit: {out} (send it to the site over a private channel)")
    print(kit.docker_run(out.resolve()))
    return 0


def _remove_site(args: argparse.Namespace, settings: Any) -> int:
    from services.common.errors import MissingInput
    from services.sites import access

    if args.definitions is not None:
        had_user = access.revoke_in_definitions(args.definitions, site=args.name)
    else:
        had_user = access.revoke_with_api(_api(args, settings), site=args.name)
    key = _keys_dir(args) / f"{args.name}.pub"
    had_key = key.exists()
    key.unlink(missing_ok=True)
    if not (had_user or had_key):
        raise MissingInput(f"no site {args.name}: no such broker user and no registered key")
    print(
        f"site {args.name}: broker user {'deleted' if had_user else 'was absent'}, "
        f"key {'unregistered' if had_key else 'was absent'}"
    )
    return 0


def _list(args: argparse.Namespace, settings: Any) -> int:
    from services.sites import access

    if args.definitions is not None:
        users = access.sites_in_definitions(args.definitions)
    else:
        users = access.sites_with_api(_api(args, settings))
    keys_dir = _keys_dir(args)
    keys = {p.stem for p in keys_dir.glob("*.pub")} if keys_dir.is_dir() else set()
    for name in sorted(set(users) | keys):
        user = "user" if name in users else "NO USER"
        key = "key registered" if name in keys else "NO KEY"
        print(f"{name}\t{user}\t{key}")
    return 0


def _api(args: argparse.Namespace, settings: Any) -> Any:
    from services.sites.management import Management

    return Management.for_broker(settings.amqp_url, args.management_url)


def _keys_dir(args: argparse.Namespace) -> Path:
    if args.keys_dir is not None:
        return Path(args.keys_dir)
    configured = os.environ.get("FEDMQ_TRAINER_KEYS")
    return Path(configured) if configured else DEFAULT_KEYS_DIR


def _vhost(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _site_url(admin_url: str, site: str, password: str, broker_host: str | None) -> str:
    parts = urllib.parse.urlsplit(admin_url)
    host = broker_host or parts.netloc.rpartition("@")[2]
    netloc = f"{urllib.parse.quote(site)}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
