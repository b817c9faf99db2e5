"""Three private RabbitMQ nodes clustered on this machine, loaded with the shipped definitions.

Each member is a `PrivateBroker` (own node name, ports and data directory); they share an
Erlang cookie of their own, so no `rabbitmqctl` call made here can reach the machine's
shared broker. Nodes 2 and 3 join node 1 with `rabbitmqctl join_cluster`; the definitions
(the Kubernetes ones by default: quorum updates and control queues) are imported once the
three run, so every quorum queue they declare has a member on each node.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from tests.support.private_broker import (
    RABBITMQ_USER,
    START_TIMEOUT_S,
    PrivateBroker,
    PrivateBrokerError,
)

REPO: Final = Path(__file__).resolve().parents[2]
CLUSTER_DEFINITIONS: Final = REPO / "infra" / "k8s" / "base" / "rabbitmq" / "definitions.json"
"""The definitions the Kubernetes `RabbitmqCluster` boots with (quorum task queues)."""
DEV_SECRETS: Final = REPO / "infra" / "secrets" / "dev"
VHOST: Final = "fedmq"
CLUSTER_SIZE: Final = 3


def dev_password(user: str) -> str:
    """The published development password of a definitions user."""
    folder = DEV_SECRETS / "trainers" if user.startswith("trainer-") else DEV_SECRETS
    return (folder / user).read_text().strip()


@dataclass
class PrivateCluster:
    """`CLUSTER_SIZE` private nodes forming one RabbitMQ cluster under `directory`."""

    directory: Path
    nodes: list[PrivateBroker]

    @classmethod
    def create(cls, size: int = CLUSTER_SIZE) -> PrivateCluster:
        """Nodes with fresh names, ports, data directories and one shared cookie (not started)."""
        directory = Path(tempfile.mkdtemp(prefix="fedmq-cluster-"))
        token, cookie = uuid.uuid4().hex[:6], secrets.token_hex(16).upper()
        nodes = [
            PrivateBroker(
                directory=directory / f"node{index}",
                node=f"fedmqtest-{token}-{index}@localhost",
                cookie=cookie,
            )
            for index in range(1, size + 1)
        ]
        return cls(directory=directory, nodes=nodes)

    def start(self) -> None:
        """Boot the nodes side by side, then cluster nodes 2.. with node 1."""
        self._hand_to_broker_user()
        for node in self.nodes:
            node.write_config()
            node.launch()
        for node in self.nodes:
            node.wait_started()
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.stop_app()
            node.ctl("join_cluster", seed.node)
            node.start_app()
        self._wait_running(len(self.nodes))

    def load_definitions(self, path: Path = CLUSTER_DEFINITIONS) -> None:
        """`rabbitmqctl import_definitions` on node 1: users, vhost, policies, queues."""
        copy = self.directory / "definitions.json"
        shutil.copyfile(path, copy)
        self._hand_to_broker_user()
        self.nodes[0].ctl("import_definitions", str(copy))

    def url(self, node: PrivateBroker, user: str = "guest", vhost: str = "/") -> str:
        """AMQP URL of one node for a definitions user (its dev password) or guest."""
        password = "guest" if user == "guest" else dev_password(user)
        return f"amqp://{user}:{password}@127.0.0.1:{node.amqp_port}/{quote(vhost, safe='')}"

    def urls(self, user: str = "guest", vhost: str = "/") -> list[str]:
        """The URL of every node, in node order."""
        return [self.url(node, user, vhost) for node in self.nodes]

    def node(self, name: str) -> PrivateBroker:
        """The member called `name` (`fedmqtest-...@localhost`)."""
        for node in self.nodes:
            if node.node == name:
                return node
        raise KeyError(f"{name!r} is not a member of this cluster")

    def queue_info(self, queue: str, vhost: str = VHOST) -> dict[str, object]:
        """`list_queues` items of `queue` (leader, members, online...) asked of a running node."""
        for node in self.running():
            try:
                out = node.ctl(
                    "list_queues", "-p", vhost, "name", "type", "leader", "members", "online",
                    "messages", "--formatter", "json",
                )  # fmt: skip
            except PrivateBrokerError:
                continue
            for row in json.loads(out):
                if row["name"] == queue:
                    return dict(row)
            raise KeyError(f"no queue {queue!r} in vhost {vhost!r}")
        raise PrivateBrokerError("no cluster node answers")

    def leader(self, queue: str, vhost: str = VHOST) -> PrivateBroker:
        """The node that leads the quorum queue `queue`."""
        return self.node(str(self.queue_info(queue, vhost)["leader"]))

    def running(self) -> list[PrivateBroker]:
        """Members whose AMQP listener is open (their RabbitMQ application runs)."""
        return [node for node in self.nodes if node.listening()]

    def stop(self) -> None:
        """Stop every node (killing one that will not stop) and remove the directory."""
        for node in self.nodes:
            try:
                node.stop()
            except PrivateBrokerError:
                node.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _wait_running(self, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            status = json.loads(self.nodes[0].ctl("cluster_status", "--formatter", "json"))
            if len(status.get("running_nodes", [])) >= count:
                return
            if time.monotonic() > deadline:
                raise PrivateBrokerError(f"the cluster did not reach {count} nodes: {status}")
            time.sleep(0.5)

    def _hand_to_broker_user(self) -> None:
        # The nodes run as the broker's user, which must traverse the cluster directory.
        try:
            shutil.chown(self.directory, RABBITMQ_USER, RABBITMQ_USER)
            for path in self.directory.glob("*.json"):
                shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)
        except (LookupError, PermissionError):
            return


@contextmanager
def running_private_cluster(
    definitions: Path | None = CLUSTER_DEFINITIONS,
) -> Iterator[PrivateCluster]:
    """A started 3-node cluster with `definitions` imported; every node stopped on exit."""
    cluster = PrivateCluster.create()
    try:
        cluster.start()
        if definitions is not None:
            cluster.load_definitions(definitions)
        yield cluster
    finally:
        cluster.stop()
