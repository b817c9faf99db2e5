"""A small client of RabbitMQ's management HTTP API: users and their permissions."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Final

from services.common.errors import BrokerRefused, BrokerUnreachable, UsageError

DEFAULT_MANAGEMENT_PORT: Final = 15672
HTTP_TIMEOUT_S: Final = 10.0
_NOT_FOUND: Final = 404


@dataclass(frozen=True)
class Management:
    """The API at `base_url` (`http://host:15672`), logged in as an administrator."""

    base_url: str
    user: str
    password: str

    @classmethod
    def for_broker(cls, amqp_url: str, management_url: str | None = None) -> Management:
        """The API of the broker `amqp_url` names, with the same login (default port 15672)."""
        parts = urllib.parse.urlsplit(amqp_url)
        if not parts.username:
            raise UsageError(f"{_redacted(amqp_url)} names no user for the management API")
        base = management_url or f"http://{parts.hostname}:{DEFAULT_MANAGEMENT_PORT}"
        user = urllib.parse.unquote(parts.username)
        return cls(base.rstrip("/"), user, urllib.parse.unquote(parts.password or ""))

    def put(self, path: str, body: dict[str, Any]) -> None:
        """PUT a JSON document."""
        self._call("PUT", path, body)

    def delete(self, path: str) -> bool:
        """DELETE a resource; False when it did not exist."""
        return self._call("DELETE", path, None, missing_ok=True) is not None

    def get(self, path: str) -> Any:
        """GET a JSON document (None when it does not exist)."""
        return self._call("GET", path, None, missing_ok=True)

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, missing_ok: bool = False
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}/api/{path}", data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            if error.code == _NOT_FOUND and missing_ok:
                return None
            if error.code in (401, 403):
                raise BrokerRefused(
                    f"the management API at {self.base_url} refused {self.user!r} "
                    f"({error.code}): it needs an administrator login",
                    hint="use an administrator's --amqp-url, or --definitions without API access",
                ) from error
            raise BrokerRefused(
                f"the management API at {self.base_url} answered {error.code} to {method} "
                f"{path}: {error.read().decode(errors='replace')[:200]}"
            ) from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise BrokerUnreachable(
                f"no management API answered at {self.base_url} ({reason})",
                hint="enable the rabbitmq_management plugin, set --management-url, or write "
                "a definitions change with --definitions",
            ) from error
        return json.loads(text) if text.strip() else {}


def quoted(name: str) -> str:
    """A vhost or user name as one URL path segment (`/` is `%2F`)."""
    return urllib.parse.quote(name, safe="")


def _redacted(url: str) -> str:
    from services.common.bus.pika_connect import redact_url

    return redact_url(url)
