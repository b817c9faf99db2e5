"""A trainer written in JavaScript from docs/protocol.md takes part in a real federation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import GlobalModel
from services.common.bus import Bus
from services.common.bus.pika_bus import PikaBus
from services.common.signing import generate_keypair, public_key_line
from services.common.topology import (
    control_queue,
    events_queue,
    follower_queue_name,
    updates_queue,
)
from tests.support.fault_kit import wait_serving
from tests.support.probe import FederationProbe
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.broker, pytest.mark.slow]

INTEROP = Path(__file__).resolve().parent
TRAINER = INTEROP / "trainer.mjs"
ALPHA = 0.5
UPDATES = 3
NODE_TIMEOUT_S = 120
JS_TRAINER = "js-site"


def _node() -> str:
    """The node binary with tests/interop's packages installed, or fail/skip saying how."""
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules").is_dir():
        message = "needs Node.js >= 18 and `npm ci` in tests/interop (.ci/run does both)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return node


@pytest.fixture
def task_id() -> str:
    return f"interop-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def bus(amqp_url: str, task_id: str) -> Iterator[Bus]:
    with PikaBus(amqp_url) as connected:
        yield connected
        for queue in (
            updates_queue(task_id),
            control_queue(task_id),
            follower_queue_name(task_id, JS_TRAINER),
            follower_queue_name(task_id, "probe"),
            events_queue(JS_TRAINER, task_id).name,
        ):
            connected.delete_queue(queue)


@pytest.fixture
def seed(tmp_path: Path) -> bytes:
    """The JS trainer's Ed25519 seed; its public key is registered in `tmp_path/keys`."""
    private, public = generate_keypair()
    (tmp_path / "keys").write_text(public_key_line(JS_TRAINER, public) + "\n")
    return private


@pytest.fixture
def aggregator(
    task_id: str, tmp_path: Path, amqp_url: str, seed: bytes
) -> Iterator[ServiceProcess]:
    # FedAsync with a constant staleness function: each update moves the model by
    # ALPHA * delta, so the model after the trainer's updates can be predicted exactly.
    # bfloat16 makes the trainer use the encoding that is easiest to get wrong, and the
    # registered key makes every update carry a signature over the canonical bytes.
    process = ServiceProcess(
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
            "--precision",
            "bfloat16",
            "--trainer-keys",
            str(tmp_path / "keys"),
        ],
        log_path=tmp_path / "aggregator.log",
        env={"FEDMQ_AMQP_URL": amqp_url},
    )
    wait_serving(process)
    yield process
    assert process.terminate() == 0, process.output()[-3000:]


def _run_trainer(node: str, task_id: str, amqp_url: str, seed: bytes) -> list[dict[str, Any]]:
    command = [
        node,
        str(TRAINER),
        *("--url", amqp_url, "--task", task_id, "--trainer", JS_TRAINER),
        *("--updates", str(UPDATES), "--malformed", "--timeout", "90"),
        *("--signing-key", seed.hex()),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _floats(model: GlobalModel) -> np.ndarray:
    parts = [t.to_numpy().ravel() for t in model.tensors if t.dtype.startswith("float")]
    return np.concatenate([p.astype(np.float32) for p in parts])


def _signs(model: GlobalModel) -> np.ndarray:
    # The trainer's delta alternates +v, -v within each tensor, starting at +v.
    parts = [
        np.where(np.arange(t.to_numpy().size) % 2 == 0, 1.0, -1.0)
        for t in model.tensors
        if t.dtype.startswith("float")
    ]
    return np.concatenate(parts).astype(np.float32)


def test_a_javascript_trainer_joins_sends_applied_updates_and_a_malformed_one_is_dead_lettered(
    bus: Bus, aggregator: ServiceProcess, task_id: str, amqp_url: str, seed: bytes
) -> None:
    node = _node()
    # Given a real aggregator requiring signed updates, and a probe holding version 0 and
    # tapping dead letters
    probe = FederationProbe(bus, task_id, "probe", amqp_url=amqp_url)
    start = probe.join().model
    assert start.version == 0

    # When the JavaScript trainer joins, sends its updates and one malformed update
    lines = _run_trainer(node, task_id, amqp_url, seed)

    # Then it received the whole model and saw every (signed) update applied, one version each
    events = {line["event"]: line for line in lines}
    joined = events["joined"]
    assert (joined["version"], joined["precision"]) == (0, "bfloat16")
    assert joined["signatures_required"] is True
    assert joined["tensors"] == len(start.tensors)
    applied = [line for line in lines if line["event"] == "update_applied"]
    assert [a["new_version"] for a in applied] == [1, 2, 3]
    assert [a["updates_applied"] for a in applied] == [1, 2, 3]
    # and the published model is exactly version 0 moved by ALPHA times each delta
    final = probe.newest_model(min_version=UPDATES, timeout=30)
    steps = sum(a["step"] for a in applied)
    expected = _floats(start) + np.float32(ALPHA * steps) * _signs(start)
    np.testing.assert_allclose(_floats(final), expected, rtol=0, atol=1e-6)
    # and the malformed update was refused with the reason docs/protocol.md gives
    rejected = events["malformed_rejected"]
    assert rejected["reason"] == "shape-mismatch"
    letters = [
        letter
        for letter in probe.dead_letters(expected=1, timeout=20)
        if letter.message_id == rejected["message_id"]
    ]
    assert [letter.reason for letter in letters] == ["shape-mismatch"]
    assert aggregator.alive()
