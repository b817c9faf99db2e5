"""Opening a pika connection: URL and TLS settings, readable errors, reconnect backoff.

Everything here runs before or between connections, so it needs no I/O thread: the bus
calls it from its own, tests and tools call it directly.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.adapters.utils.io_services_utils
import pika.exceptions

from services.common.bus.errors import AccessRefused, ConnectionLost, TlsError

DEFAULT_HEARTBEAT_S: Final = 30
"""AMQP heartbeat interval asked of the broker; a dead peer is noticed after about twice it."""
BLOCKED_CONNECTION_TIMEOUT_S: Final = 60.0
"""A connection the broker blocks (memory/disk alarm) longer than this is dropped and redone."""
SOCKET_TIMEOUT_S: Final = 10.0
"""TCP connect timeout."""
STACK_TIMEOUT_S: Final = 15.0
"""Timeout for TCP + TLS + AMQP handshake together."""
RECONNECT_INITIAL_DELAY_S: Final = 0.5
"""First pause after a lost connection."""
RECONNECT_MAX_DELAY_S: Final = 30.0
"""Cap of the pause between two attempts."""
RECONNECT_MULTIPLIER: Final = 2.0
"""Growth of the pause per failed attempt."""
RECONNECT_JITTER: Final = 0.5
"""Fraction of the pause drawn at random, so that many clients do not retry in lockstep."""
RECONNECT_MAX_ATTEMPTS: Final = 30
"""Failed attempts in a row (about 12 minutes with the defaults) before the bus gives up."""
_MAX_EXPONENT: Final = 64

SOCKET_READ_BYTES: Final = 128 * 1024
"""Bytes asked of the socket per read. pika asks for 4 KiB: 11,000 reads and Python frame
hand-offs per 45 MiB update, which made receiving, not the broker, the limit (about 1.5x
the consume rate with 128 KiB, benchmarks.ingest)."""
SOCKET_READS_PER_TURN: Final = 8
"""Reads per turn of the I/O loop before it looks at timers and queued work again."""


def tune_socket_reads() -> None:
    """Make pika read the socket in large chunks (process-wide, idempotent).

    pika has no public setting for it; the class attributes are stable across pika 1.x
    and are left alone where a future pika renamed them.
    """
    transport = getattr(pika.adapters.utils.io_services_utils, "_AsyncTransportBase", None)
    if transport is None or not hasattr(transport, "_MAX_RECV_BYTES"):
        return
    transport._MAX_RECV_BYTES = SOCKET_READ_BYTES
    transport._MAX_CONSUME_BYTES = SOCKET_READ_BYTES * SOCKET_READS_PER_TURN


@dataclass(frozen=True)
class ReconnectPolicy:
    """Bounded, jittered, capped exponential backoff; the attempt count resets on success."""

    initial_delay_s: float = RECONNECT_INITIAL_DELAY_S
    max_delay_s: float = RECONNECT_MAX_DELAY_S
    multiplier: float = RECONNECT_MULTIPLIER
    jitter: float = RECONNECT_JITTER
    max_attempts: int = RECONNECT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if not 0 < self.initial_delay_s <= self.max_delay_s:
            raise ValueError("need 0 < initial_delay_s <= max_delay_s")
        if self.multiplier < 1.0:
            raise ValueError("multiplier must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        growth = self.multiplier ** min(attempt, _MAX_EXPONENT)
        capped = min(self.max_delay_s, self.initial_delay_s * growth)
        return capped * (1.0 - self.jitter * rand())


def connection_parameters(
    url: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    allow_insecure_remote: bool = False,
    heartbeat: int = DEFAULT_HEARTBEAT_S,
    connection_name: str | None = None,
) -> Any:
    """pika connection parameters for an amqp:// or amqps:// URL, TLS verified against ca_file.

    Plain amqp:// to a host other than loopback is refused unless `allow_insecure_remote`.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise ValueError(f"unsupported broker URL scheme {parts.scheme!r}: use amqp:// or amqps://")
    host = parts.hostname or "localhost"
    if scheme == "amqp":
        if ca_file or cert_file or key_file:
            raise ValueError("ca_file, cert_file and key_file need an amqps:// URL")
        if not allow_insecure_remote and not _is_loopback(host):
            raise ValueError(
                f"refusing plain amqp:// to {host!r}: credentials and model updates would cross "
                "the network unencrypted. Use amqps:// (with ca_file), or pass "
                "allow_insecure_remote=True inside a trusted network."
            )
    if key_file and not cert_file:
        raise ValueError("key_file needs cert_file")
    if heartbeat < 0:
        raise ValueError(f"heartbeat must be >= 0, got {heartbeat}")
    params = pika.URLParameters(url)
    if scheme == "amqps":
        params.ssl_options = pika.SSLOptions(
            tls_context(ca_file, cert_file, key_file), server_hostname=host
        )
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_S
    params.connection_attempts = 1  # retries are ours, with backoff
    params.socket_timeout = SOCKET_TIMEOUT_S
    params.stack_timeout = STACK_TIMEOUT_S
    name = connection_name or f"fedmq pid {os.getpid()} on {socket.gethostname()}"
    params.client_properties = {"connection_name": name}
    return params


def tls_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context verifying the broker against `ca_file` (system CAs when None)."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsError(
            f"could not load TLS files (ca_file={ca_file!r}, cert_file={cert_file!r}, "
            f"key_file={key_file!r}): {exc}"
        ) from exc
    return context


def open_connection(params: Any, where: str) -> Any:
    """Open a BlockingConnection, translating every failure into our errors."""
    try:
        return pika.BlockingConnection(params)
    except (
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.AuthenticationError,
    ) as exc:
        raise AccessRefused(
            f"the broker at {where} refused the login: check the user name and password"
        ) from exc
    except pika.exceptions.ProbableAccessDeniedError as exc:
        raise AccessRefused(
            f"the broker at {where} refused access to the virtual host: check the "
            "user's permissions"
        ) from exc
    except pika.exceptions.ConnectionClosedByBroker as exc:
        if exc.reply_code in (403, 530):
            raise AccessRefused(f"the broker at {where} refused access: {exc.reply_text}") from exc
        raise ConnectionLost(
            f"the broker at {where} closed the connection: {exc.reply_text}"
        ) from exc
    except (ssl.SSLError, pika.exceptions.AMQPConnectionError, OSError) as exc:
        tls = _find_ssl_error(exc)
        if tls is not None:
            raise tls_error(tls, where) from exc
        if params.ssl_options is not None:
            refused = tls_alert_error(exc, where)
            if refused is not None:
                raise refused from exc
            if _TLS_EOF in str(exc):
                raise ConnectionLost(
                    f"the broker at {where} closed the TLS connection before AMQP started: "
                    "if it requires client certificates, set cert_file and key_file "
                    "(FEDMQ_CERT_FILE, FEDMQ_KEY_FILE)"
                ) from exc
        raise ConnectionLost(f"could not connect to the broker at {where}: {_reason(exc)}") from exc


_HOST_MISMATCH_CODES: Final = frozenset({62, 64})
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""
_TLS_ALERT: Final = re.compile(
    r"\[SSL: (?:SSLV3|TLSV1|TLSV13)_ALERT_(?P<code>[A-Z_]+)\] (?P<text>[a-z0-9 ]+)"
)
"""A TLS alert the broker sent, as pika reports it: only as text inside its own error."""
_TLS_EOF: Final = "SSLEOFError"


def tls_error(exc: ssl.SSLError, where: str) -> TlsError:
    """A `TlsError` whose message says what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _HOST_MISMATCH_CODES:
            return TlsError(
                f"the TLS certificate of the broker at {where} does not name the host in the "
                f"URL ({exc.verify_message}): connect with a host name the certificate lists"
            )
        return TlsError(
            f"the TLS certificate of the broker at {where} could not be verified "
            f"({exc.verify_message}): check that ca_file (FEDMQ_CA_FILE) holds the CA that "
            "signed it"
        )
    return TlsError(f"the TLS handshake with the broker at {where} failed: {exc}")


def tls_alert_error(exc: BaseException, where: str) -> TlsError | None:
    """The broker's refusal of our TLS connection, or None when `exc` reports no TLS alert.

    Under TLS 1.3 the client's handshake ends before the broker has checked the client's
    certificate, so a refusal arrives as an alert on the first read, which pika wraps as text.
    """
    match = _TLS_ALERT.search(str(exc))
    if match is None:
        return None
    alert = match["text"].strip()
    if match["code"] == "CERTIFICATE_REQUIRED":
        return TlsError(
            f"the broker at {where} requires a client certificate ({alert}): set cert_file and "
            "key_file (FEDMQ_CERT_FILE, FEDMQ_KEY_FILE) to one signed by a CA the broker trusts"
        )
    return TlsError(
        f"the broker at {where} refused the TLS connection ({alert}): check that cert_file "
        "holds a client certificate signed by a CA the broker trusts and still valid"
    )


def _reason(exc: BaseException, depth: int = 0) -> str:
    """The socket's own words when pika wraps them (`Connection refused`), else `exc` itself."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if depth < 5:
        nested = [*exc.args, exc.__cause__, getattr(exc, "exception", None)]
        for inner in nested:
            if isinstance(inner, BaseException):
                found = _reason(inner, depth + 1)
                if found != repr(inner):
                    return found
    return repr(exc)


def _find_ssl_error(exc: BaseException, depth: int = 0) -> ssl.SSLError | None:
    if isinstance(exc, ssl.SSLError):
        return exc
    if depth > 5:
        return None
    nested = [*exc.args, exc.__cause__, exc.__context__, getattr(exc, "exception", None)]
    for inner in nested:
        if isinstance(inner, BaseException):
            found = _find_ssl_error(inner, depth + 1)
            if found is not None:
                return found
    return None


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """`url` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
