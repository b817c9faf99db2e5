"""A private RabbitMQ node with a real TLS listener, using certificates made for the test.

The node is configured as `infra/rabbitmq/rabbitmq.tls.conf` configures production
(`verify_peer`, TLS 1.2/1.3), on a loopback port of its own; `require_client_cert` turns on
`fail_if_no_peer_cert` for mutual TLS. Its plain listener stays on for test bookkeeping.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.support.pki import CertifiedKey, TestCa, make_ca
from tests.support.private_broker import (
    PrivateBroker,
    free_port,
    rabbitmq_installed,
    running_private_broker,
)

CLIENT_NAME: Final = "site-tls"
"""Common name of the client certificate the CA issues for mutual TLS."""


@dataclass(frozen=True)
class BrokerConnection:
    """One client connection as the broker sees it (`rabbitmqctl list_connections`)."""

    name: str
    """The client's `connection_name` property."""
    port: int
    """The broker port the client connected to."""
    ssl: bool
    ssl_protocol: str
    peer_cert_subject: str
    """Subject of the certificate the client presented; empty when it presented none."""


@dataclass(frozen=True)
class TlsBroker:
    """A running node with a TLS listener on `tls_port` and the CA that signed its certificate."""

    node: PrivateBroker
    ca: TestCa
    tls_port: int
    client: CertifiedKey
    """A client certificate signed by `ca`."""
    require_client_cert: bool

    def url(self, host: str = "localhost") -> str:
        """amqps URL of the TLS listener for the guest account (guest may log in on loopback)."""
        return f"amqps://guest:guest@{host}:{self.tls_port}/%2F"

    @property
    def plain_url(self) -> str:
        """The node's plain loopback listener, for bookkeeping the test does not want to prove."""
        return self.node.amqp_url

    def connections(self) -> dict[str, BrokerConnection]:
        """The node's open client connections, by connection name."""
        fields = ("port", "ssl", "ssl_protocol", "peer_cert_subject", "client_properties")
        rows = json.loads(self.node.ctl("list_connections", "--formatter", "json", *fields))
        found = {}
        for row in rows:
            properties = {name: value for name, _type, value in row["client_properties"]}
            name = str(properties.get("connection_name", ""))
            found[name] = BrokerConnection(
                name=name,
                port=int(row["port"]),
                ssl=bool(row["ssl"]),
                ssl_protocol=str(row["ssl_protocol"]),
                peer_cert_subject=str(row["peer_cert_subject"]),
            )
        return found


def require_rabbitmq_installed() -> None:
    """Fail (with `CI` set) or skip the test when no private node can be started here."""
    if rabbitmq_installed():
        return
    message = "rabbitmq-server is not installed: a private TLS broker node cannot be started"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tls_config_lines(
    ca: TestCa, server: CertifiedKey, *, port: int, require_client_cert: bool
) -> list[str]:
    """rabbitmq.conf lines of a TLS listener on 127.0.0.1:`port` (see rabbitmq.tls.conf)."""
    return [
        f"listeners.ssl.default = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {ca.ca_file}",
        f"ssl_options.certfile = {server.cert_file}",
        f"ssl_options.keyfile = {server.key_file}",
        "ssl_options.verify = verify_peer",
        f"ssl_options.fail_if_no_peer_cert = {str(require_client_cert).lower()}",
        "ssl_options.versions.1 = tlsv1.3",
        "ssl_options.versions.2 = tlsv1.2",
    ]


@contextmanager
def running_tls_broker(*, require_client_cert: bool = False) -> Iterator[TlsBroker]:
    """A started node with a TLS listener; stopped and removed (certificates too) on exit."""
    directory = Path(tempfile.mkdtemp(prefix="fedmq-tls-broker-"))
    tls = directory / "tls"
    ca = make_ca(tls, "broker")
    server = ca.issue_server(tls)
    client = ca.issue_client(tls, CLIENT_NAME)
    port = free_port()
    lines = tls_config_lines(ca, server, port=port, require_client_cert=require_client_cert)
    try:
        with running_private_broker(lines, directory=directory) as node:
            yield TlsBroker(
                node=node,
                ca=ca,
                tls_port=port,
                client=client,
                require_client_cert=require_client_cert,
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # also when the node failed to start
