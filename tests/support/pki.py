"""Certificates made for one test run: a CA, a broker certificate and client certificates.

EC P-256 keys and SHA-256 signatures, valid for a day; nothing here is meant to leave /tmp.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY: Final = datetime.timedelta(days=1)
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
"""Certificates start a little in the past so a node's clock a bit behind ours accepts them."""
SERVER_DNS_NAME: Final = "localhost"
"""The only name the broker certificate carries: `127.0.0.1` in a URL is a hostname mismatch."""


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key, as PEM files."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class TestCa:
    """A certificate authority that can sign server and client certificates."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    ca_file: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def issue_server(self, directory: Path, *, dns_name: str = SERVER_DNS_NAME) -> CertifiedKey:
        """A broker certificate for `dns_name` (TLS server authentication only)."""
        return self._issue(
            directory, f"{self.name}-server", dns_name, ExtendedKeyUsageOID.SERVER_AUTH
        )

    def issue_client(self, directory: Path, common_name: str) -> CertifiedKey:
        """A client certificate for mutual TLS (TLS client authentication only)."""
        return self._issue(
            directory,
            f"{self.name}-client-{common_name}",
            common_name,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )

    def _issue(
        self, directory: Path, label: str, name: str, usage: x509.ObjectIdentifier
    ) -> CertifiedKey:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        issued = CertifiedKey(directory / f"{label}.pem", directory / f"{label}.key")
        issued.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key_file.write_bytes(_key_pem(key))
        issued.key_file.chmod(0o600)
        return issued


def make_ca(directory: Path, name: str) -> TestCa:
    """A self-signed CA named `fedmq test CA <name>`, its certificate written to `<name>-ca.pem`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = _name(f"fedmq test CA {name}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    ca_file = directory / f"{name}-ca.pem"
    ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TestCa(name=name, ca_file=ca_file, key=key, cert=cert)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
