"""The aggregator as a real process against the real broker: math, dead letters, crashes."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from schemas import SCHEMA_HEADER, SCHEMA_VERSION, GlobalModel, encode
from services.common.bus import Bus
from services.common.bus.pika_bus import PikaBus
from services.common.settings import DEFAULT_AMQP_URL
from services.common.topology import control_queue, updates_queue
from tests.support.fault_kit import log_events, wait_serving
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ALPHA = 0.5
SLOW_COMMITS = {
    "FEDMQ_COMMIT_IDLE_GRACE": "5",
    "FEDMQ_CHECKPOINT_EVERY": "1000",
    "FEDMQ_CHECKPOINT_INTERVAL": "600",
}


@pytest.fixture
def task_id() -> str:
    return f"agg-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus(task_id: str) -> Iterator[Bus]:
    with PikaBus(DEFAULT_AMQP_URL) as connected:
        yield connected
        for queue in (updates_queue(task_id), control_queue(task_id)):
            connected.delete_queue(queue)


def _start_aggregator(
    task_id: str,
    tmp_path: Path,
    *extra: str,
    log_name: str = "aggregator.log",
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    return ServiceProcess(
        [
            "aggregator",
            "--task-id",
            task_id,
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--model",
            "cnn-small",
            "--strategy",
            "fedasync",
            "--alpha",
            str(ALPHA),
            "--staleness",
            "constant",
            *extra,
        ],
        log_path=tmp_path / log_name,
        env=env,
    )


def _resumed_version(process: ServiceProcess) -> int:
    resumed = log_events(process, "resuming_from_checkpoint")
    return resumed[0]["version"] if resumed else 0


def _floats(model: GlobalModel) -> np.ndarray:
    return np.concatenate(
        [t.to_numpy().ravel() for t in model.tensors if t.dtype.startswith("float")]
    )


@pytest.fixture
def aggregator(task_id: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    process = _start_aggregator(task_id, tmp_path, "--max-staleness", "2")
    yield process
    assert process.terminate() == 0, process.output()[-3000:]


def test_hand_made_updates_advance_the_model_as_fedasync_predicts(
    bus: Bus, task_id: str, aggregator: ServiceProcess
) -> None:
    # Given a trainer-less probe that joined and holds version 0
    probe = FederationProbe(bus, task_id, "site-a")
    start = probe.join().model
    assert start.version == 0
    # When it publishes two deltas, the second one based on the stale version 0
    probe.publish(probe.update(start, 0.2))
    v1 = probe.newest_model(min_version=1)
    probe.publish(probe.update(start, 0.4, base_version=0))
    v2 = probe.newest_model(min_version=2)
    # Then each version moved by alpha * s(staleness) * delta, s = 1 (constant)
    assert (v1.version, v2.version) == (1, 2)
    np.testing.assert_allclose(_floats(v1), _floats(start) + ALPHA * 0.2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_floats(v2), _floats(v1) + ALPHA * 0.4, rtol=1e-6, atol=1e-7)
    assert v2.updates_applied == 2


def _raw_update(probe: FederationProbe, model: GlobalModel, **changes: object) -> bytes:
    fields = probe.update(model, 0.1).model_dump()
    fields.update(changes)
    return msgpack.packb({"schema": SCHEMA_VERSION, **fields}, use_bin_type=True)


def test_bad_updates_land_in_the_dead_letter_queue_with_their_reason(
    bus: Bus, task_id: str, aggregator: ServiceProcess
) -> None:
    probe = FederationProbe(bus, task_id, "site-b")
    model = probe.join().model
    headers = {SCHEMA_HEADER: SCHEMA_VERSION}
    nan_delta = [
        {
            "name": t.name,
            "dtype": "float32",
            "shape": list(t.shape),
            "data": np.full(t.shape, math.nan, np.float32).tobytes(),
        }
        for t in model.tensors
        if t.dtype == "float32"
    ]
    first = model.tensors[0]
    wrong_shape = [{"name": first.name, "dtype": "float32", "shape": [3], "data": b"\0" * 12}]
    duplicate = probe.update(model, 0.01)
    sent = {
        probe.publish_raw(b"\xc1garbage", headers=headers): "not-msgpack",
        probe.publish_raw(
            _raw_update(probe, model, delta=nan_delta), headers=headers
        ): "non-finite",
        probe.publish_raw(
            _raw_update(probe, model, delta=wrong_shape), headers=headers
        ): "shape-mismatch",
        probe.publish(probe.update(model, 0.1, task_id="elsewhere")): "unknown-task",
        probe.publish(probe.update(model, 0.1, base_version=99)): "future-version",
        probe.publish_raw(
            encode(duplicate), content_type="text/plain", headers=headers
        ): "content-type",
    }
    probe.publish(duplicate)
    sent[probe.publish(duplicate)] = "duplicate"
    # stale: three more versions, then an update based on version 0 (max staleness 2)
    current = probe.newest_model(min_version=1)
    for _ in range(3):
        probe.publish(probe.update(current, 0.0))
        current = probe.newest_model(min_version=current.version + 1)
    sent[probe.publish(probe.update(model, 0.1, base_version=0))] = "stale"

    letters = probe.dead_letters(expected=len(sent))
    reasons = {letter.message_id: letter.reason for letter in letters}
    assert reasons == sent
    assert all(letter.detail for letter in letters)
    # and the aggregator keeps serving: a good update still becomes a new version
    current = probe.newest_model(min_version=4)
    probe.publish(probe.update(current, 0.05))
    assert probe.newest_model(min_version=current.version + 1).version == current.version + 1
    assert aggregator.alive()


def test_an_aggregator_killed_mid_stream_applies_every_update_exactly_once(
    bus: Bus, task_id: str, tmp_path: Path
) -> None:
    # Given an aggregator that makes versions durable only after 5 quiet seconds, so that a
    # burst of updates is applied in memory, unacked and not yet checkpointed for a while
    def start_aggregator() -> ServiceProcess:
        process = _start_aggregator(
            task_id, tmp_path, log_name=f"aggregator-{len(processes)}.log", env=SLOW_COMMITS
        )
        processes.append(process)
        wait_serving(process)
        return process

    processes: list[ServiceProcess] = []
    try:
        aggregator = start_aggregator()
        probe = FederationProbe(bus, task_id, "site-c")
        start = probe.join().model
        fills = [0.001 * (i + 1) for i in range(40)]
        bursts = [fills[i : i + 10] for i in range(0, 40, 10)]
        # When every other burst is followed at once by a SIGKILL, and a restart
        for index, burst in enumerate(bursts):
            for fill in burst:
                probe.publish(probe.update(start, fill, base_version=0))
            if index % 2 == 0:
                assert probe.newest_model(min_version=10 * (index + 1)).version == 10 * (index + 1)
                continue
            aggregator.kill()
            assert probe.newest_model().version == 10 * index  # the burst died undurable
            aggregator = start_aggregator()
            assert _resumed_version(aggregator) == 10 * index
        final = probe.newest_model(min_version=40, timeout=60)
    finally:
        for process in processes:
            if process.alive():
                assert process.terminate() == 0, process.output()[-3000:]
    # Then versions never went backwards, and every update was applied exactly once
    assert probe.versions_seen == sorted(probe.versions_seen)
    assert final.version == 40
    assert final.updates_applied == 40
    expected = _floats(start) + ALPHA * sum(fills)
    np.testing.assert_allclose(_floats(final), expected, rtol=1e-5, atol=1e-6)
