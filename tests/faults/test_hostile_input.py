"""Ten thousand hostile messages straight into the update and control queues of an aggregator."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pika
import pytest

from schemas import GlobalModel, encode
from services.common.topology import CONTROL_EXCHANGE, UPDATES_EXCHANGE, join_key
from tests.support.fault_kit import (
    DeadLetterRecord,
    FaultFederation,
    drain_dead_letters,
    finite,
    rss_bytes,
    wait_serving,
)
from tests.support.hostile import (
    BUILDERS,
    Hostile,
    damaged_full_update,
    hostile_join,
    overflowing_float64,
)
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.broker, pytest.mark.slow]

SEED = 7
HOSTILE_UPDATES = 8_000
HOSTILE_JOINS = 2_000
DAMAGED_FULL = 40
OVERFLOWING = 5
OVERSIZED = 3
VALID = 100
ALPHA = 0.5
MAX_MESSAGE_BYTES = 4_000_000
RSS_GROWTH_LIMIT = 150 * 2**20
"""The aggregator may warm caches, but ten thousand messages must not leave a trail."""


@dataclass(frozen=True)
class Outgoing:
    """One message of the run: where it goes and whether it is one of the valid updates."""

    index: int
    exchange: str
    routing_key: str
    message: Hostile
    valid: bool = False


def _floats(model: GlobalModel) -> np.ndarray:
    return np.concatenate(
        [t.to_numpy().ravel() for t in model.tensors if t.dtype.startswith("float")]
    )


def _plan(
    federation: FaultFederation, start: GlobalModel, probe: FederationProbe
) -> list[Outgoing]:
    rng = random.Random(SEED)
    task = federation.task_id
    full = encode(probe.update(start, 0.0))
    messages: list[Hostile] = [rng.choice(BUILDERS)(rng, task) for _ in range(HOSTILE_UPDATES)]
    messages += [damaged_full_update(rng, full) for _ in range(DAMAGED_FULL)]
    messages += [Hostile("overflowing-float64", overflowing_float64(probe.update(start, 0.0)))
                 for _ in range(OVERFLOWING)]  # fmt: skip
    messages += [
        Hostile("oversized", rng.randbytes(MAX_MESSAGE_BYTES + 1000)) for _ in range(OVERSIZED)
    ]
    joins = [hostile_join(rng, task) for _ in range(HOSTILE_JOINS)]
    plan = [Outgoing(i, UPDATES_EXCHANGE, f"update.{task}.f{i}", m) for i, m in enumerate(messages)]
    offset = len(plan)
    plan += [Outgoing(offset + i, CONTROL_EXCHANGE, join_key(task), m) for i, m in enumerate(joins)]
    rng.shuffle(plan)
    # the valid updates, spread evenly through the stream
    offset = len(plan)
    step = len(plan) // VALID
    for i in range(VALID):
        fill = 1e-4 * (i % 7 + 1)
        update = encode(probe.update(start, fill, base_version=0))
        valid = Outgoing(offset + i, UPDATES_EXCHANGE, f"update.{task}.v{i}",
                         Hostile(f"valid:{fill}", update), valid=True)  # fmt: skip
        plan.insert(i * (step + 1), valid)
    return plan


def _publish_all(amqp_url: str, plan: list[Outgoing]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for out in plan:
            message = out.message
            message_id = f"fz-{out.index}" if message.message_id == "set-by-publisher" else None
            if message.message_id not in ("set-by-publisher", None):
                message_id = message.message_id
            properties = pika.BasicProperties(
                content_type=message.content_type,
                type=message.kind,
                message_id=message_id,
                headers=message.headers,
                delivery_mode=2,
            )
            channel.basic_publish(out.exchange, out.routing_key, message.body, properties)
    finally:
        connection.close()


def _newest_while_alive(
    probe: FederationProbe, aggregator: ServiceProcess, version: int, *, timeout: float
) -> GlobalModel:
    deadline = time.monotonic() + timeout
    while True:
        assert aggregator.alive(), aggregator.output()[-3000:]
        try:
            return probe.newest_model(min_version=version, timeout=5)
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def _dead_letters_of(
    federation: FaultFederation, aggregator: ServiceProcess, expected: int
) -> list[DeadLetterRecord]:
    dead: list[DeadLetterRecord] = []

    def enough() -> bool:
        assert aggregator.alive(), aggregator.output()[-3000:]
        found = drain_dead_letters(federation.amqp_url)
        dead.extend(d for d in found if federation.task_id in d.routing_key)
        return len(dead) >= expected

    try:
        wait_for(enough, timeout=240, interval=1.0, what=f"{expected} dead letters")
    except AssertionError as timeout:
        raise AssertionError(f"{timeout} (found {len(dead)})") from None
    return dead


def _sample_rss(pid: int, samples: list[int], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        try:
            samples.append(rss_bytes(pid))
        except (FileNotFoundError, AssertionError):
            return


def test_ten_thousand_hostile_messages_are_dead_lettered_while_every_valid_update_is_applied(
    federation: FaultFederation,
) -> None:
    """Random, truncated, bit-flipped, mistyped, huge, NaN, mislabelled messages: each ends in
    `fedmq.dead` with a reason, every valid update lands, memory stays flat, no NaN."""
    # Given a serving aggregator and a probe holding version 0
    aggregator = federation.aggregator(
        "--model", "cnn-small", "--strategy", "fedasync", "--alpha", str(ALPHA),
        "--staleness", "constant", FEDMQ_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
    )  # fmt: skip
    wait_serving(aggregator)
    with federation.bus() as bus:
        probe = FederationProbe(bus, federation.task_id, "fuzz-probe", amqp_url=federation.amqp_url)
        start = probe.join().model
        plan = _plan(federation, start, probe)
        baseline = rss_bytes(aggregator.pid)
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(aggregator.pid, samples, stop))
        sampler.start()
        started = time.monotonic()
        bad = [out for out in plan if not out.valid]
        try:
            # When the whole stream is published with confirms
            _publish_all(federation.amqp_url, plan)
            published_s = time.monotonic() - started
            # Then the aggregator applies every valid update without stalling
            final = _newest_while_alive(probe, aggregator, VALID, timeout=240)
            applied_s = time.monotonic() - started
            dead = _dead_letters_of(federation, aggregator, len(bad))
            drained_s = time.monotonic() - started
        finally:
            stop.set()
            sampler.join()
    assert aggregator.alive(), aggregator.output()[-3000:]
    # every bad message is in fedmq.dead, with a reason; no valid one is
    by_key = Counter(d.routing_key for d in dead if d.routing_key.startswith("update."))
    bad_updates = {out.routing_key for out in bad if out.exchange == UPDATES_EXCHANGE}
    assert set(by_key) == bad_updates and set(by_key.values()) == {1}
    bad_joins = [out for out in bad if out.exchange == CONTROL_EXCHANGE]
    assert sum(1 for d in dead if d.routing_key.startswith("join.")) == len(bad_joins)
    assert all(d.reason for d in dead)
    reasons = Counter(d.reason for d in dead)
    overflow_keys = {o.routing_key for o in bad if o.message.label == "overflowing-float64"}
    assert {d.reason for d in dead if d.routing_key in overflow_keys} == {"non-finite"}
    assert reasons["oversized"] >= OVERSIZED
    # the model holds exactly the valid updates, and no NaN
    assert final.version == VALID and final.updates_applied == VALID
    fills = [float(out.message.label.split(":")[1]) for out in plan if out.valid]
    expected = _floats(start) + ALPHA * sum(fills)
    np.testing.assert_allclose(_floats(final), expected, rtol=1e-5, atol=1e-6)
    assert finite(_floats(final))
    # memory stays bounded
    peak = max(samples, default=baseline)
    assert peak - baseline < RSS_GROWTH_LIMIT, (baseline, peak)
    print(
        f"\nFAULTS fuzzed={len(bad)} valid={VALID} dead={len(dead)} published_s={published_s:.1f} "
        f"applied_s={applied_s:.1f} drained_s={drained_s:.1f} rss_before={baseline / 2**20:.0f}MiB "
        f"rss_peak={peak / 2**20:.0f}MiB rss_after={rss_bytes(aggregator.pid) / 2**20:.0f}MiB "
        f"reasons={dict(reasons.most_common())}"
    )
