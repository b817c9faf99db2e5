"""One hostile site against a live federation on a private broker with the shipped definitions.

The session shares one node and one federation (starting either takes tens of seconds):
an aggregator with per-site logins (`--require-user-id-match`), a real trainer
(`trainer-site-0`, the victim), an honest site sending valid updates by hand
(`trainer-site-1`), and the attacker's login (`trainer-site-2`), which holds exactly the
permissions the shipped definitions give every site.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from schemas import GlobalModel, JoinAccepted, JoinRequest, ModelUpdate, Tensor
from services.aggregator.checkpoint import Checkpoint, CheckpointStore
from services.common.bus.pika_bus import PikaBus
from services.common.messaging import call_message, publish_message
from services.common.topology import (
    CONTROL_EXCHANGE,
    UPDATES_EXCHANGE,
    follower_queue_name,
    join_key,
    own_follower_topology,
    update_key,
)
from services.trainer.follower import ModelFollower, newest_of
from tests.datagen import pneumonia_npz
from tests.support.adversary import ADMIN, TASK, DeadLetterReader, Node, definitions_broker
from tests.support.fault_kit import FAST_RECONNECT, logged, rss_bytes, wait_serving
from tests.support.private_broker import rabbitmq_installed
from tests.support.processes import ServiceProcess, wait_for

VICTIM = "trainer-site-0"
HONEST = "trainer-site-1"
ATTACKER = "trainer-site-2"
JOIN_TIMEOUT_S = 120.0


@pytest.fixture(scope="package")
def node() -> Iterator[Node]:
    """The private node, with the shipped definitions imported at boot."""
    if not rabbitmq_installed():
        message = "rabbitmq-server is not installed: a private broker node cannot be started"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with definitions_broker() as started:
        yield started


class HonestSite:
    """A site sending valid updates by hand, with nothing but a site's permissions."""

    def __init__(self, bus: PikaBus, trainer_id: str) -> None:
        self.bus = bus
        self.trainer_id = trainer_id
        bus.declare(own_follower_topology(TASK, trainer_id))
        self._follower = ModelFollower(bus, follower_queue_name(TASK, trainer_id), task_id=TASK)
        self.latest: GlobalModel | None = None

    def join(self) -> JoinAccepted:
        """Join with the site's own login vouching for its id."""
        request = JoinRequest(task_id=TASK, trainer_id=self.trainer_id, num_examples=100)
        reply = call_message(
            self.bus, CONTROL_EXCHANGE, join_key(TASK), request,
            accept=(JoinAccepted,), timeout=JOIN_TIMEOUT_S, user_id=self.trainer_id,
        )  # fmt: skip
        self.latest = newest_of(self.latest, reply.model)
        return reply

    def newest_model(self) -> GlobalModel:
        """The newest model seen on the site's follower queue (or in the join reply)."""
        self.latest = newest_of(self.latest, self._follower.newest(newer_than=None))
        assert self.latest is not None
        return self.latest

    def update(self, fill: float, *, trainer_id: str | None = None) -> ModelUpdate:
        """A valid update of the newest model: `fill` in every float coordinate."""
        model = self.newest_model()
        delta = tuple(
            Tensor.from_numpy(t.name, np.full(t.shape, fill, np.float32))
            for t in model.tensors
            if t.dtype.startswith("float")
        )
        return ModelUpdate(
            task_id=TASK,
            trainer_id=trainer_id or self.trainer_id,
            base_version=model.version,
            num_examples=100,
            delta=delta,
        )

    def send(self, update: ModelUpdate) -> None:
        """Publish with confirms under the site's own key and login."""
        key = update_key(TASK, self.trainer_id)
        publish_message(self.bus, UPDATES_EXCHANGE, key, update, user_id=self.trainer_id)


@dataclass
class Federation:
    """The live processes, the honest site and the evidence the tests read."""

    node: Node
    run_dir: Path
    data_dir: Path
    aggregator: ServiceProcess
    victim: ServiceProcess
    evaluator: ServiceProcess
    honest: HonestSite
    dead: DeadLetterReader
    processes: list[ServiceProcess] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        """The aggregator's checkpoints of the task."""
        return self.run_dir / "checkpoints" / TASK

    def checkpoint(self) -> Checkpoint:
        """The newest checkpoint, which must exist."""
        saved = CheckpointStore(self.checkpoint_dir).latest()
        assert saved is not None
        return saved

    def aggregator_rss(self) -> int:
        """Resident set size of the aggregator now."""
        return rss_bytes(self.aggregator.pid)

    def send_valid(self, count: int = 3) -> list[str]:
        """`count` valid updates from the honest site; returns their update ids once applied."""
        ids = []
        for _ in range(count):
            update = self.honest.update(1e-4)
            self.honest.send(update)
            ids.append(update.update_id)
        wait_for(
            lambda: set(ids) <= set(self.checkpoint().applied_ids),
            timeout=60,
            what="the honest site's valid updates to be applied and checkpointed",
        )
        return ids

    def assert_healthy(self, *, rss_before: int, rss_bound: int) -> None:
        """Victim and aggregator alive, valid updates applied, RSS bounded, weights finite."""
        assert self.aggregator.alive(), self.aggregator.output()[-3000:]
        assert self.victim.alive(), self.victim.output()[-3000:]
        assert self.evaluator.alive(), self.evaluator.output()[-3000:]
        self.send_valid()
        grown = self.aggregator_rss() - rss_before
        assert grown < rss_bound, f"aggregator RSS grew by {grown / 2**20:.0f} MiB"
        saved = self.checkpoint()
        assert np.isfinite(saved.weights).all()

    def start_aggregator(self) -> ServiceProcess:
        """A (new) aggregator process for the task, with per-site logins required."""
        process = ServiceProcess(
            [
                "aggregator",
                "--checkpoint-dir",
                str(self.run_dir / "checkpoints"),
                "--require-user-id-match",
                "--strategy",
                "fedasync",
                "--alpha",
                "0.5",
            ],
            log_path=self.run_dir / "logs" / f"aggregator-{uuid.uuid4().hex[:6]}.log",
            env=_env(self.node, "aggregator", self.data_dir),
        )
        self.processes.append(process)
        wait_serving(process)
        return process


def _env(node: Node, login: str, data_dir: Path) -> dict[str, str]:
    return {
        "FEDMQ_AMQP_URL": node.url(login),
        "FEDMQ_TASK_ID": TASK,
        "FEDMQ_DATA_DIR": str(data_dir),
        "FEDMQ_LOG_JSON": "true",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="package")
def federation(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Aggregator, victim trainer and honest site, serving; every process ended afterwards.

    Package scope, not session: the trainers train without pause, and left running they
    would take a core from every test after this folder's.
    """
    run_dir = tmp_path_factory.mktemp("adversarial")
    data_dir = pneumonia_npz(tmp_path_factory.mktemp("data")).parent
    bus = PikaBus(node.url(HONEST), reconnect=FAST_RECONNECT, connection_name="honest-site")
    processes: list[ServiceProcess] = []
    try:
        fed = Federation(
            node=node,
            run_dir=run_dir,
            data_dir=data_dir,
            aggregator=None,  # type: ignore[arg-type]  (set just below)
            victim=None,  # type: ignore[arg-type]
            evaluator=None,  # type: ignore[arg-type]
            honest=HonestSite(bus, HONEST),
            dead=DeadLetterReader(node.url(ADMIN)),
            processes=processes,
        )
        fed.aggregator = fed.start_aggregator()
        fed.victim = ServiceProcess(
            ["trainer", "--trainer-id", VICTIM, "--site-index", "0", "--num-sites", "4"],
            log_path=run_dir / "logs" / "victim.log",
            env=_env(node, VICTIM, data_dir),
        )
        processes.append(fed.victim)
        fed.evaluator = ServiceProcess(
            ["evaluator", "--log-path", str(run_dir / "eval.jsonl")],
            log_path=run_dir / "logs" / "evaluator.log",
            env=_env(node, "evaluator", data_dir),
        )
        processes.append(fed.evaluator)
        fed.honest.join()
        for process in (fed.victim, fed.evaluator):
            wait_for(
                lambda p=process: logged(p, "joined") >= 1 or not p.alive(),
                timeout=JOIN_TIMEOUT_S,
                what="the victim trainer and the evaluator to join",
            )
            assert process.alive(), process.output()[-3000:]
        yield fed
    finally:
        for process in processes:
            if process.alive():
                process.terminate(timeout=20)
        bus.close()


def valid_update(federation: Federation, trainer_id: str) -> ModelUpdate:
    """A well-formed update of the current model claiming `trainer_id`."""
    return federation.honest.update(1e-4, trainer_id=trainer_id)
