"""A federation on a private 3-node RabbitMQ cluster while its nodes go down and come back.

Run alone with `pytest -m cluster`. The cluster (three Erlang nodes) is started once for
the module and loaded with the Kubernetes definitions: quorum updates, control and dead
queues, one broker user per service. Every process gets the URLs of the three nodes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from schemas import ModelPublished, decode
from services.common.topology import EVENTS_EXCHANGE, UPDATES_EXCHANGE, updates_queue
from tests.support.fault_kit import (
    FaultFederation,
    confirmed_update_ids,
    drain_dead_letters,
    logged,
    wait_serving,
)
from tests.support.private_broker import PrivateBroker, rabbitmq_installed
from tests.support.private_cluster import PrivateCluster, running_private_cluster
from tests.support.processes import ServiceProcess, wait_for
from tests.support.replay import BrokerTap, replay_weights, task_of, updates_by_id

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.faults,
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.e2e,
]

TASK = "pneumonia"
"""The task the shipped definitions provision (queues, users, permissions)."""
TRAINERS = 4
PROGRESS = 4
"""Updates applied, and confirmed by trainers, while each node is down."""
PHASE_TIMEOUT_S = 180.0
STARTUP_TIMEOUT_S = 300.0
"""Processes importing torch on a shared 2-core machine can take minutes to serve."""
TASK_FILE = {
    "spec": {
        "task_id": TASK, "model": "cnn-small", "num_classes": 2, "local_steps": 2,
        "batch_size": 32, "heartbeat_interval": 2.0, "seed": 0,
    },
    "strategy": {"name": "fedasync", "alpha": 0.3, "staleness": "polynomial"},
    "queue_type": "quorum",
}  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    """Three clustered private nodes for the module; all stopped afterwards."""
    if not rabbitmq_installed():
        message = "rabbitmq-server is not installed: a private cluster cannot be started"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with running_private_cluster() as started:
        yield started


def _rotated(urls: list[str], by: int) -> str:
    """The node list starting at node `by`: spreads the processes over the nodes."""
    shift = by % len(urls)
    return ",".join(urls[shift:] + urls[:shift])


def _versions(eval_log: Path) -> list[int]:
    if not eval_log.exists():
        return []
    lines = [json.loads(line) for line in eval_log.read_text().splitlines() if line]
    return [line["version"] for line in lines if line["split"] == "val"]


@pytest.mark.timeout(1800)
def test_a_federation_on_three_nodes_loses_no_update_and_applies_none_twice_as_nodes_go_down(
    cluster: PrivateCluster, tmp_path: Path, data_dir: Path
) -> None:
    """The node leading the updates queue stops mid-federation, later another one: every
    process fails over by itself, each update reaches the model exactly once (proved by
    replaying the updates the broker saw), versions only go up, nobody is restarted."""
    admin = cluster.urls("fedmq-admin", "fedmq")
    federation = FaultFederation(
        amqp_url=admin[0], run_dir=tmp_path, data_dir=data_dir, task_id=TASK
    )
    updates_tap = BrokerTap(admin[0], "test.tap.updates", UPDATES_EXCHANGE, f"update.{TASK}.*")
    models_tap = BrokerTap(admin[0], "test.tap.models", EVENTS_EXCHANGE, f"model.published.{TASK}")
    updates_tap.declare()
    models_tap.declare()
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(TASK_FILE))
    eval_log = tmp_path / "eval.jsonl"
    follower = {"FEDMQ_FOLLOWER_QUEUE_TYPE": "quorum"}
    try:
        aggregator = federation.aggregator(
            "--task-file", str(task_file),
            FEDMQ_AMQP_URLS=_rotated(cluster.urls("aggregator", "fedmq"), 0),
            FEDMQ_REQUIRE_USER_ID_MATCH="true",
        )  # fmt: skip
        # One at a time: six processes importing torch at once starve a busy 2-core machine.
        wait_serving(aggregator, timeout=STARTUP_TIMEOUT_S)
        trainers = [
            federation.trainer(
                f"trainer-site-{i}", site=i, sites=TRAINERS, FEDMQ_SIMULATED_SLOWDOWN="2",
                FEDMQ_AMQP_URLS=_rotated(cluster.urls(f"trainer-site-{i}", "fedmq"), i),
                **follower,
            )
            for i in range(TRAINERS)
        ]  # fmt: skip
        evaluator = federation.evaluator(
            eval_log, FEDMQ_AMQP_URLS=_rotated(cluster.urls("evaluator", "fedmq"), 1), **follower
        )
        processes = [aggregator, evaluator, *trainers]
        pids = [p.pid for p in processes]
        _wait_progress(federation, trainers, eval_log, timeout=STARTUP_TIMEOUT_S)
        stopped: list[str] = []
        first = cluster.leader(updates_queue(TASK))
        for choose in (lambda: first, lambda: _another(cluster, first)):
            # Given a federation making progress on three nodes (waited for above)
            # When a node stops (the updates queue's leader first)
            node = choose()
            stopped.append(node.node)
            node.stop_app()
            # Then the two others carry the federation on
            _wait_progress(federation, trainers, eval_log)
            # And when it comes back, it catches up and the federation goes on
            node.start_app()
            wait_for(lambda: _online(cluster) == 3, timeout=PHASE_TIMEOUT_S,
                     what="the updates queue's member on the restarted node")  # fmt: skip
            _wait_progress(federation, trainers, eval_log)
        for process in processes:
            assert process.alive(), process.output()[-3000:]
        assert [p.pid for p in processes] == pids
        for trainer in trainers:
            assert trainer.terminate() == 0, trainer.output()[-3000:]
        confirmed = {uid for t in trainers for uid in confirmed_update_ids(t)}
        wait_for(lambda: confirmed <= _applied(federation), timeout=PHASE_TIMEOUT_S,
                 what="every confirmed update applied")  # fmt: skip
        assert evaluator.terminate() == 0, evaluator.output()[-3000:]
        assert aggregator.terminate() == 0, aggregator.output()[-3000:]
    finally:
        federation.close()
    saved = federation.checkpoint()
    assert saved is not None
    copies = updates_tap.drain()
    sent = updates_by_id(copies)
    published = [_version(body) for body in models_tap.drain()]
    applied = list(saved.applied_ids)
    dead = [d for d in drain_dead_letters(admin[0]) if TASK in d.routing_key]
    # 0 lost: every update confirmed to a trainer, and every one the broker took, is applied
    assert confirmed <= set(applied)
    assert set(sent) == set(applied)
    # 0 applied twice: the aggregator's weights are those of each update applied once
    replayed = replay_weights(task_of(task_file), sent, applied, scratch=tmp_path / "replay")
    np.testing.assert_allclose(saved.weights, replayed, rtol=0, atol=1e-6)
    # (the same check would see one update applied twice: its copy under another id)
    twice = sent[applied[0]].model_copy(update={"update_id": uuid.uuid4().hex})
    doubled = replay_weights(
        task_of(task_file),
        {**sent, twice.update_id: twice},
        [applied[0], twice.update_id, *applied[1:]],
        scratch=tmp_path / "replay-doubled",
    )
    assert not np.allclose(saved.weights, doubled, rtol=0, atol=1e-6)
    # redeliveries caused by the node losses are far from poison: a re-sent copy whose first
    # copy had arrived is the only dead letter allowed
    assert {d.reason for d in dead} <= {"duplicate"}, dead[:5]
    # versions only go up, as published and as evaluated
    assert published == sorted(published) and published[-1] == saved.version
    versions = _versions(eval_log)
    assert versions == sorted(set(versions))
    assert saved.version == len(applied)  # FedAsync: one version per update
    assert logged(aggregator, "connected") >= 2  # it was on the first node stopped
    print(
        f"\nCLUSTER stopped={stopped} sent={len(sent)} copies={len(copies)} "
        f"confirmed={len(confirmed)} applied={len(applied)} version={saved.version} "
        f"dead_letters={[d.reason for d in dead]} "
        f"aggregator_connects={logged(aggregator, 'connected')}"
    )


def _version(body: bytes) -> int:
    event = decode(body, accept=(ModelPublished,))
    assert isinstance(event, ModelPublished)
    return event.version


def _applied(federation: FaultFederation) -> set[str]:
    saved = federation.checkpoint()
    return set() if saved is None else set(saved.applied_ids)


def _sent(trainers: list[ServiceProcess]) -> int:
    return sum(len(confirmed_update_ids(t)) for t in trainers)


def _wait_progress(
    federation: FaultFederation,
    trainers: list[ServiceProcess],
    eval_log: Path,
    *,
    timeout: float = PHASE_TIMEOUT_S,
) -> None:
    """Wait for `PROGRESS` more updates confirmed and applied, and a newer evaluation."""
    sent, applied = _sent(trainers), len(_applied(federation))
    evaluated = max(_versions(eval_log), default=-1)
    checks: list[tuple[Callable[[], bool], str]] = [
        (lambda: _sent(trainers) >= sent + PROGRESS, "trainers' updates confirmed"),
        (lambda: len(_applied(federation)) >= applied + PROGRESS, "updates applied"),
        (lambda: max(_versions(eval_log), default=-1) > evaluated, "a newer evaluation"),
    ]
    for check, what in checks:
        wait_for(check, timeout=timeout, what=what)


def _online(cluster: PrivateCluster) -> int:
    online = cluster.queue_info(updates_queue(TASK))["online"]
    assert isinstance(online, list)
    return len(online)


def _another(cluster: PrivateCluster, first: PrivateBroker) -> PrivateBroker:
    """The updates queue's leader now, unless that is `first` again: then another node."""
    leader = cluster.leader(updates_queue(TASK))
    if leader is not first:
        return leader
    return next(node for node in cluster.nodes if node is not first)
