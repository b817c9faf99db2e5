"""amqps: the broker's certificate is verified against our CA; plain amqp stays on loopback.

The broker listens without TLS, so a small TLS-terminating proxy in front of it plays the
part of a TLS listener, with certificates made for the test.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.bus import TlsError
from services.common.bus.pika_bus import PikaBus, connection_parameters, redact_url
from services.common.topology import EVENTS_EXCHANGE, event_key, shared_topology

PROXY_BUFFER_BYTES = 65536


@dataclass(frozen=True)
class Pki:
    """A CA certificate and a server certificate for localhost/127.0.0.1 it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_pki(directory: Path, label: str) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"fedmq test CA {label}"))
        .issuer_name(_name(f"fedmq test CA {label}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        directory / f"{label}-ca.pem",
        directory / f"{label}-server.pem",
        directory / f"{label}-server.key",
    )
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


class TlsProxy:
    """Accepts TLS on an ephemeral loopback port and pipes the plaintext to the broker."""

    def __init__(self, pki: Pki, upstream: tuple[str, int]) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(pki.cert_file, pki.key_file)
        self._upstream = upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self.handshake_failures = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self._context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1
            client.close()
            return
        broker = socket.create_connection(self._upstream)
        threading.Thread(target=_pipe, args=(secure, broker), daemon=True).start()
        _pipe(broker, secure)


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(PROXY_BUFFER_BYTES):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return _make_pki(tmp_path, "good")


@pytest.fixture
def tls_url(amqp_url: str, pki: Pki) -> Iterator[str]:
    plain = urlsplit(amqp_url)
    proxy = TlsProxy(pki, (plain.hostname or "127.0.0.1", plain.port or 5672))
    yield f"amqps://{plain.username}:{plain.password}@localhost:{proxy.port}{plain.path}"
    proxy.close()


@pytest.mark.broker
def test_amqps_with_the_right_ca_connects_and_publishes_with_confirms(
    tls_url: str, pki: Pki
) -> None:
    with PikaBus(tls_url, ca_file=str(pki.ca_file), topology=shared_topology()) as bus:
        message_id = bus.publish(EVENTS_EXCHANGE, event_key("eval", "tls"), b"", kind="X")
        assert len(message_id) == 32


@pytest.mark.broker
def test_amqps_with_a_certificate_from_another_ca_is_a_clear_tls_error(
    tls_url: str, tmp_path: Path
) -> None:
    other = _make_pki(tmp_path, "other")
    with pytest.raises(TlsError, match=r"could not be verified .* check that ca_file"):
        PikaBus(tls_url, ca_file=str(other.ca_file), connect_timeout=10)


def test_plain_amqp_to_a_remote_host_is_refused_before_any_connection() -> None:
    with pytest.raises(ValueError, match=r"refusing plain amqp:// to '10\.1\.2\.3'.*amqps://"):
        PikaBus("amqp://guest:guest@10.1.2.3:5672/%2F")


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:p@localhost/%2F",
        "amqp://u:p@127.0.0.1:5672/%2F",
        "amqp://u:p@[::1]:5672/%2F",
        "amqp://u:p@10.1.2.3/%2F",
    ],
)
def test_loopback_hosts_or_an_explicit_opt_in_allow_plain_amqp(url: str) -> None:
    params = connection_parameters(url, allow_insecure_remote="10.1.2.3" in url)
    assert params.ssl_options is None


def test_amqps_parameters_verify_the_server_named_in_the_url(pki: Pki) -> None:
    params = connection_parameters(
        "amqps://u:p@broker.example:5671/%2F", ca_file=str(pki.ca_file), heartbeat=15
    )
    assert params.ssl_options.server_hostname == "broker.example"
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert params.ssl_options.context.check_hostname
    assert (params.port, params.heartbeat) == (5671, 15)


def test_tls_files_with_a_plain_url_are_refused_rather_than_ignored(pki: Pki) -> None:
    with pytest.raises(ValueError, match="need an amqps:// URL"):
        connection_parameters("amqp://u:p@localhost/%2F", ca_file=str(pki.ca_file))


def test_urls_in_logs_and_errors_hide_the_password() -> None:
    assert (
        redact_url("amqps://trainer:s3cret@broker:5671/fl") == "amqps://trainer:***@broker:5671/fl"
    )
    assert redact_url("amqp://localhost/") == "amqp://localhost/"
