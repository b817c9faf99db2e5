"""Grant and revoke a site's broker user: through the management API or a definitions file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from services.common.errors import MissingInput, UsageError
from services.sites.management import Management, quoted
from services.sites.rights import (
    HASHING_ALGORITHM,
    follower_permissions,
    password_hash,
    trainer_topic_permissions,
)

SITE_TAG: Final = "fedmq-site"
"""Tag of every user `fedmq site add` made: `site list` finds them by it."""


def grant_with_api(api: Management, *, vhost: str, site: str, task_id: str, password: str) -> None:
    """Create the site's user with its password and least-privilege permissions."""
    user, v = quoted(site), quoted(vhost)
    api.put(f"users/{user}", {"password": password, "tags": SITE_TAG})
    api.put(f"permissions/{v}/{user}", follower_permissions(task_id, site))
    for topic in trainer_topic_permissions(task_id, site):
        api.put(f"topic-permissions/{v}/{user}", topic)


def revoke_with_api(api: Management, *, site: str) -> bool:
    """Delete the site's user (its permissions and open connections go with it)."""
    return api.delete(f"users/{quoted(site)}")


def sites_with_api(api: Management) -> list[str]:
    """Names of the users tagged as sites."""
    users = api.get("users") or []
    return sorted(u["name"] for u in users if SITE_TAG in _tags(u.get("tags")))


def grant_in_definitions(path: Path, *, vhost: str, site: str, task_id: str, password: str) -> None:
    """Add the site's user and permissions to a definitions file, for `import_definitions`."""
    document = _read(path)
    revoke_in_definitions(path, site=site, document=document)
    document.setdefault("users", []).append(
        {
            "name": site,
            "password_hash": password_hash(password),
            "hashing_algorithm": HASHING_ALGORITHM,
            "tags": [SITE_TAG],
            "limits": {},
        }
    )
    document.setdefault("permissions", []).append(
        {"user": site, "vhost": vhost, **follower_permissions(task_id, site)}
    )
    document.setdefault("topic_permissions", []).extend(
        {"user": site, "vhost": vhost, **topic}
        for topic in trainer_topic_permissions(task_id, site)
    )
    _write(path, document)


def revoke_in_definitions(path: Path, *, site: str, document: dict[str, Any] | None = None) -> bool:
    """Remove the site's user and permissions from a definitions file; False when absent."""
    document = _read(path) if document is None else document
    users = document.get("users", [])
    found = any(u.get("name") == site for u in users)
    document["users"] = [u for u in users if u.get("name") != site]
    for key in ("permissions", "topic_permissions"):
        document[key] = [p for p in document.get(key, []) if p.get("user") != site]
    _write(path, document)
    return found


def sites_in_definitions(path: Path) -> list[str]:
    """Names of the users tagged as sites in a definitions file."""
    return sorted(
        u["name"] for u in _read(path).get("users", []) if SITE_TAG in _tags(u.get("tags"))
    )


def _tags(tags: Any) -> list[str]:
    if isinstance(tags, str):
        return [t.strip() for t in tags.split(",")]
    return list(tags or [])


def _read(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInput(f"definitions file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(document, dict):
        raise UsageError(f"{path}: RabbitMQ definitions are a JSON object")
    return document


def _write(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
