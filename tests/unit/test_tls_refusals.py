"""The broker's TLS refusals, which pika reports only as text, become errors a person can act on.

Under TLS 1.3 the broker checks the client certificate after the client's handshake ended, so
its alert (or, when the alert is lost behind a TCP reset, an EOF) reaches pika on the first
read and is wrapped in pika's own error as text. The strings below are what pika 1.4 raised
against RabbitMQ 3.10 (tests/integration/test_bus_tls.py runs the real thing).
"""

from __future__ import annotations

from pathlib import Path

import pika
import pika.exceptions
import pytest

from services.common.bus import ConnectionLost, TlsError
from services.common.bus.pika_connect import connection_parameters, open_connection
from tests.support.pki import make_ca

WHERE = "amqps://site:***@broker:5671/fedmq"


def _pika_lost(inner: str) -> pika.exceptions.AMQPConnectionError:
    return pika.exceptions.IncompatibleProtocolError(
        f'StreamLostError: ("Stream connection lost: {inner}",)'
    )


def _open_failing_with(
    error: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    def refuse(_params: object) -> None:
        raise error

    monkeypatch.setattr(pika, "BlockingConnection", refuse)
    ca = make_ca(tmp_path, "unit")
    open_connection(connection_parameters(url, ca_file=str(ca.ca_file)), WHERE)


def test_a_certificate_required_alert_tells_the_operator_to_set_a_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fail_if_no_peer_cert` on the broker: not a retryable outage but a missing setting."""
    alert = _pika_lost(
        "SSLError(1, '[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
        "required (_ssl.c:2580)')"
    )
    with pytest.raises(TlsError) as refused:
        _open_failing_with(alert, tmp_path, monkeypatch, "amqps://site:pw@broker:5671/fedmq")
    assert str(refused.value) == (
        f"the broker at {WHERE} requires a client certificate (tlsv13 alert certificate "
        "required): set cert_file and key_file (FEDMQ_CERT_FILE, FEDMQ_KEY_FILE) to one "
        "signed by a CA the broker trusts"
    )


def test_an_unknown_ca_alert_points_at_the_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker does not trust the CA of our client certificate."""
    alert = _pika_lost(
        "SSLError(1, '[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)')"
    )
    with pytest.raises(TlsError, match=r"refused the TLS connection \(tlsv1 alert unknown ca\)"):
        _open_failing_with(alert, tmp_path, monkeypatch, "amqps://site:pw@broker:5671/fedmq")


def test_an_eof_before_amqp_stays_retryable_but_names_the_likely_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EOF may be a broker going down, so it is retried; its message still says what to check."""
    eof = _pika_lost("SSLEOFError(8, 'EOF occurred in violation of protocol (_ssl.c:2427)')")
    with pytest.raises(ConnectionLost) as lost:
        _open_failing_with(eof, tmp_path, monkeypatch, "amqps://site:pw@broker:5671/fedmq")
    assert "closed the TLS connection before AMQP started" in str(lost.value)
    assert "FEDMQ_CERT_FILE" in str(lost.value)
