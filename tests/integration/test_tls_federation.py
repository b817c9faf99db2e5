"""A federation step over amqps: real `fedmq aggregator` and `fedmq trainer` processes.

Both services are configured as an operator configures them (docs/security.md):
`FEDMQ_AMQP_URL=amqps://...`, `FEDMQ_CA_FILE`, and for the trainer a client certificate in
`FEDMQ_CERT_FILE`/`FEDMQ_KEY_FILE`. The broker is a private node with a real TLS listener
configured like `infra/rabbitmq/rabbitmq.tls.conf`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.bus import Bus
from services.common.bus.pika_bus import PikaBus
from tests.datagen import write_medmnist_npz
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess, wait_for
from tests.support.tls_broker import CLIENT_NAME, BrokerConnection, TlsBroker

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TRAINER_ID = "site-tls"
VERSION_TIMEOUT_S = 180.0
"""Process start (torch import) and one small local round on a loaded 2-core machine."""


def _tls_env(broker: TlsBroker, *, client_cert: bool) -> dict[str, str]:
    env = {
        "FEDMQ_AMQP_URL": broker.url(),
        "FEDMQ_CA_FILE": str(broker.ca.ca_file),
        "FEDMQ_ALLOW_INSECURE_REMOTE": "false",
    }
    if client_cert:
        env["FEDMQ_CERT_FILE"] = str(broker.client.cert_file)
        env["FEDMQ_KEY_FILE"] = str(broker.client.key_file)
    return env


def _connections_of(
    broker: TlsBroker, *processes: ServiceProcess
) -> tuple[BrokerConnection | None, ...]:
    """The broker's view of each process's connection (services name it after their pid)."""
    connections = broker.connections().values()

    def of(process: ServiceProcess) -> BrokerConnection | None:
        prefix = f"fedmq pid {process.pid} "
        return next((c for c in connections if c.name.startswith(prefix)), None)

    return tuple(of(process) for process in processes)


@pytest.fixture
def task_id() -> str:
    return f"tls-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def observer(tls_broker: TlsBroker) -> Iterator[Bus]:
    """The test's own amqps bus to watch models arrive."""
    with PikaBus(tls_broker.url(), ca_file=str(tls_broker.ca.ca_file)) as bus:
        yield bus


@pytest.fixture
def aggregator(tls_broker: TlsBroker, task_id: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    """`fedmq aggregator` over amqps, verifying the broker with FEDMQ_CA_FILE only."""
    process = ServiceProcess(
        [
            "aggregator",
            "--task-id",
            task_id,
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--strategy",
            "fedasync",
            "--local-steps",
            "2",
            "--batch-size",
            "16",
        ],
        log_path=tmp_path / "aggregator.log",
        env=_tls_env(tls_broker, client_cert=False),
    )
    yield process
    assert process.terminate() == 0, process.output()[-3000:]


@pytest.fixture
def trainer(
    tls_broker: TlsBroker, task_id: str, tmp_path: Path, aggregator: ServiceProcess
) -> Iterator[ServiceProcess]:
    """`fedmq trainer` on a small generated dataset, over amqps with a client certificate."""
    data = write_medmnist_npz(tmp_path / "data" / "pneumoniamnist.npz", sizes=(160, 32, 32))
    env = _tls_env(tls_broker, client_cert=True)
    env.update(FEDMQ_TASK_ID=task_id, FEDMQ_TRAINER_ID=TRAINER_ID, FEDMQ_DATA_DIR=str(data.parent))
    process = ServiceProcess(["trainer"], log_path=tmp_path / "trainer.log", env=env)
    yield process
    assert process.terminate() == 0, process.output()[-3000:]


def test_a_trainer_update_becomes_a_new_model_version_with_every_service_on_amqps(
    tls_broker: TlsBroker,
    task_id: str,
    observer: Bus,
    aggregator: ServiceProcess,
    trainer: ServiceProcess,
) -> None:
    """Aggregator and trainer connect through the TLS listener and a federation step completes.

    The broker's own connection list proves the path: both services are on its TLS port,
    the trainer presenting its client certificate, the aggregator none.
    """
    # Given an aggregator and a trainer started with amqps settings (fixtures), and a watcher
    probe = FederationProbe(observer, task_id, "observer-tls")
    start = probe.join().model
    # When the trainer sends its first update
    newer = probe.newest_model(min_version=start.version + 1, timeout=VERSION_TIMEOUT_S)
    # Then the aggregator applied it and published a new version over TLS
    assert newer.version > start.version
    assert newer.updates_applied >= 1
    seen: tuple[BrokerConnection | None, ...] = (None, None)

    def both_listed() -> bool:
        nonlocal seen
        seen = _connections_of(tls_broker, aggregator, trainer)
        return None not in seen

    wait_for(both_listed, timeout=30, what="both services' connections in the broker's list")
    by_aggregator, by_trainer = seen
    assert by_aggregator is not None and by_trainer is not None
    assert (by_aggregator.port, by_aggregator.ssl) == (tls_broker.tls_port, True)
    assert (by_trainer.port, by_trainer.ssl) == (tls_broker.tls_port, True)
    assert by_aggregator.peer_cert_subject == ""
    assert by_trainer.peer_cert_subject == f"CN={CLIENT_NAME}"
    assert aggregator.alive() and trainer.alive()
