"""amqps against a real RabbitMQ TLS listener: who is trusted, who is refused, and how clearly.

The broker is a private node of this module's own with a TLS listener on a loopback port and
certificates the test made (`tests/support/pki.py`); a second node requires client
certificates (mutual TLS). Plain amqp stays on loopback unless explicitly allowed.
"""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path

import pytest

from services.common.bus import TlsError, TransportError
from services.common.bus.pika_bus import PikaBus
from services.common.bus.pika_connect import connection_parameters, redact_url
from services.common.topology import QueueSpec, Topology
from tests.integration.conftest import FAST_RECONNECT, wait_for
from tests.support.pki import make_ca
from tests.support.tls_broker import CLIENT_NAME, TlsBroker

ROUND_TRIP_TIMEOUT_S = 10.0
REFUSAL_TIMEOUT_S = 20.0
"""Long enough for a retried refusal to come back as the broker's TLS alert (see below)."""


def _name(label: str) -> str:
    return f"test.tls.{label}.{uuid.uuid4().hex[:10]}"


def _round_trip(bus: PikaBus) -> bytes:
    """Publish one message with confirms to a fresh queue and read it back."""
    queue = _name("queue")
    bus.declare(Topology(queues=(QueueSpec(name=queue, durable=False, auto_delete=True),)))
    body = uuid.uuid4().bytes
    bus.publish("", queue, body, kind="tls-probe")
    delivery = None

    def arrived() -> bool:
        nonlocal delivery
        delivery = bus.get(queue)
        return delivery is not None

    wait_for(arrived, timeout=ROUND_TRIP_TIMEOUT_S, what="the message back over TLS")
    assert delivery is not None
    bus.ack(delivery)
    return delivery.body


@pytest.mark.broker
def test_a_bus_that_trusts_the_ca_round_trips_a_message_over_the_tls_listener(
    tls_broker: TlsBroker,
) -> None:
    """amqps with the CA connects, publishes with confirms and consumes; the broker saw TLS."""
    # Given a bus that verifies the broker against the test CA, without a client certificate
    name = _name("ca-only")
    with PikaBus(tls_broker.url(), ca_file=str(tls_broker.ca.ca_file), connection_name=name) as bus:
        # When it sends a message through a queue and reads it back
        sent_and_received = _round_trip(bus)
        seen = tls_broker.connections()[name]
    # Then the message made it and the broker served the connection on its TLS listener
    assert len(sent_and_received) == 16
    assert (seen.port, seen.ssl, seen.peer_cert_subject) == (tls_broker.tls_port, True, "")
    assert seen.ssl_protocol in ("tlsv1.2", "tlsv1.3")


@pytest.mark.broker
def test_a_client_whose_ca_bundle_lacks_the_brokers_ca_fails_with_a_clear_tls_error(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """A CA bundle without the signing CA: `TlsError` saying what failed and what to check."""
    other = make_ca(tmp_path, "other")
    with pytest.raises(TlsError) as refused:
        PikaBus(tls_broker.url(), ca_file=str(other.ca_file), connect_timeout=REFUSAL_TIMEOUT_S)
    message = str(refused.value)
    assert "could not be verified (self-signed certificate in certificate chain)" in message
    assert "check that ca_file (FEDMQ_CA_FILE) holds the CA that signed it" in message
    assert f"localhost:{tls_broker.tls_port}" in message
    assert "guest:guest" not in message  # the password never reaches errors


@pytest.mark.broker
def test_a_url_host_the_broker_certificate_does_not_name_fails_as_a_hostname_mismatch(
    tls_broker: TlsBroker,
) -> None:
    """The certificate names `localhost` only: the same listener reached as 127.0.0.1 is refused."""
    with pytest.raises(TlsError, match=r"does not name the host in the URL \(IP address mismatch"):
        PikaBus(
            tls_broker.url(host="127.0.0.1"),
            ca_file=str(tls_broker.ca.ca_file),
            connect_timeout=REFUSAL_TIMEOUT_S,
        )


@pytest.mark.broker
def test_a_broker_requiring_client_certificates_refuses_a_client_without_one_clearly(
    mutual_tls_broker: TlsBroker,
) -> None:
    """`fail_if_no_peer_cert`: a client with only the CA is told to set cert_file and key_file.

    Under TLS 1.3 the broker's refusal (an alert) can be lost behind the TCP reset, which
    looks like an EOF and is retried; the alert is then read on a later attempt. Either way
    the message says what is missing.
    """
    with pytest.raises(TransportError) as refused:
        PikaBus(
            mutual_tls_broker.url(),
            ca_file=str(mutual_tls_broker.ca.ca_file),
            reconnect=FAST_RECONNECT,
            connect_timeout=REFUSAL_TIMEOUT_S,
        )
    message = str(refused.value)
    assert "set cert_file and key_file (FEDMQ_CERT_FILE, FEDMQ_KEY_FILE)" in message
    if isinstance(refused.value, TlsError):
        assert "requires a client certificate (tlsv13 alert certificate required)" in message


@pytest.mark.broker
def test_a_client_certificate_signed_by_the_ca_is_accepted_for_mutual_tls(
    mutual_tls_broker: TlsBroker,
) -> None:
    """With cert_file/key_file from the broker's CA the bus connects; the broker saw the cert."""
    name = _name("mutual")
    client = mutual_tls_broker.client
    with PikaBus(
        mutual_tls_broker.url(),
        ca_file=str(mutual_tls_broker.ca.ca_file),
        cert_file=str(client.cert_file),
        key_file=str(client.key_file),
        connection_name=name,
    ) as bus:
        assert len(_round_trip(bus)) == 16
        seen = mutual_tls_broker.connections()[name]
    assert (seen.ssl, seen.peer_cert_subject) == (True, f"CN={CLIENT_NAME}")


@pytest.mark.broker
def test_a_client_certificate_from_another_ca_is_refused_by_the_broker(
    mutual_tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """The broker does not know the client's CA: a `TlsError` pointing at cert_file."""
    stranger = make_ca(tmp_path, "stranger").issue_client(tmp_path, "intruder")
    with pytest.raises(TransportError) as refused:
        PikaBus(
            mutual_tls_broker.url(),
            ca_file=str(mutual_tls_broker.ca.ca_file),
            cert_file=str(stranger.cert_file),
            key_file=str(stranger.key_file),
            reconnect=FAST_RECONNECT,
            connect_timeout=REFUSAL_TIMEOUT_S,
        )
    message = str(refused.value)
    if isinstance(refused.value, TlsError):
        assert "refused the TLS connection (tlsv1 alert unknown ca)" in message
        assert "check that cert_file holds a client certificate signed by a CA" in message
    else:  # every alert lost behind a reset (see above): still no silent retry forever
        assert "closed the TLS connection before AMQP started" in message


@pytest.mark.broker
@pytest.mark.slow
def test_a_mutual_tls_bus_reconnects_with_its_client_certificate_after_a_broker_restart(
    mutual_tls_broker: TlsBroker,
) -> None:
    """The client certificate is presented again on reconnect: the bus works after a restart."""
    # Given a bus connected with a client certificate
    name = _name("reconnect")
    client = mutual_tls_broker.client
    with PikaBus(
        mutual_tls_broker.url(),
        ca_file=str(mutual_tls_broker.ca.ca_file),
        cert_file=str(client.cert_file),
        key_file=str(client.key_file),
        reconnect=FAST_RECONNECT,
        connection_name=name,
    ) as bus:
        # When the broker application stops and starts again
        mutual_tls_broker.node.stop_app()
        mutual_tls_broker.node.start_app()
        wait_for(lambda: bus.connects == 2, timeout=60, what="the bus to reconnect over TLS")
        # Then the new connection presented the certificate and carries messages
        assert len(_round_trip(bus)) == 16
        seen = mutual_tls_broker.connections()[name]
    assert (seen.ssl, seen.peer_cert_subject) == (True, f"CN={CLIENT_NAME}")


def test_plain_amqp_to_a_remote_host_is_refused_before_any_connection() -> None:
    """Credentials never cross the network in clear by accident."""
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
    """Loopback needs no TLS; a remote host only with `allow_insecure_remote`."""
    params = connection_parameters(url, allow_insecure_remote="10.1.2.3" in url)
    assert params.ssl_options is None


def test_amqps_parameters_verify_the_server_named_in_the_url(tmp_path: Path) -> None:
    """The TLS context requires a certificate and checks it names the URL's host."""
    ca = make_ca(tmp_path, "params")
    params = connection_parameters(
        "amqps://u:p@broker.example:5671/%2F", ca_file=str(ca.ca_file), heartbeat=15
    )
    assert params.ssl_options.server_hostname == "broker.example"
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert params.ssl_options.context.check_hostname
    assert (params.port, params.heartbeat) == (5671, 15)


def test_tls_files_with_a_plain_url_are_refused_rather_than_ignored(tmp_path: Path) -> None:
    """A CA file next to an amqp:// URL is a mistake worth stopping at."""
    ca = make_ca(tmp_path, "plain")
    with pytest.raises(ValueError, match="need an amqps:// URL"):
        connection_parameters("amqp://u:p@localhost/%2F", ca_file=str(ca.ca_file))


def test_urls_in_logs_and_errors_hide_the_password() -> None:
    """What we log names the broker and the user, never the password."""
    assert (
        redact_url("amqps://trainer:s3cret@broker:5671/fl") == "amqps://trainer:***@broker:5671/fl"
    )
    assert redact_url("amqp://localhost/") == "amqp://localhost/"
