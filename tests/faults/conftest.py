"""Fixtures of the fault suite: private brokers, real data, federations that always clean up.

No test here touches the machine's shared broker: those that stop a broker get a node of
their own (`private_broker`), the others share one private node for the whole session
(`fault_broker`), so that thousands of dead letters never reach anyone else's queues.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.datagen import pneumonia_npz
from tests.support.fault_kit import FaultFederation
from tests.support.private_broker import PrivateBroker, rabbitmq_installed, running_private_broker


@pytest.fixture(scope="session")
def fault_broker() -> Iterator[PrivateBroker]:
    """One private RabbitMQ node shared by the fault tests that never stop their broker."""
    if not rabbitmq_installed():
        message = "rabbitmq-server is not installed: a private broker node cannot be started"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with running_private_broker() as broker:
        yield broker


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `pneumoniamnist.npz` (the real one when this machine has it)."""
    return pneumonia_npz(tmp_path_factory.mktemp("data")).parent


@pytest.fixture
def federation(
    fault_broker: PrivateBroker, tmp_path: Path, data_dir: Path
) -> Iterator[FaultFederation]:
    """Processes of one task on the session's private broker; all ended after the test."""
    fed = FaultFederation(amqp_url=fault_broker.amqp_url, run_dir=tmp_path, data_dir=data_dir)
    yield fed
    fed.close()


@pytest.fixture
def restartable(
    private_broker: PrivateBroker, tmp_path: Path, data_dir: Path
) -> Iterator[tuple[FaultFederation, PrivateBroker]]:
    """Processes of one task on a broker of the test's own, which it may stop and restart."""
    fed = FaultFederation(amqp_url=private_broker.amqp_url, run_dir=tmp_path, data_dir=data_dir)
    yield fed, private_broker
    fed.close()
