"""infra/rabbitmq/definitions.json loaded into the real local RabbitMQ: least privilege, proven.

The definitions go in through the management HTTP API (guest/guest from localhost) into
their own vhost `fedmq`, apart from the default vhost other tests use; the fixture
deletes that vhost and the definitions' users afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

from services.common.topology import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    MODELS_EXCHANGE,
    UPDATES_EXCHANGE,
    QueueSpec,
    events_queue,
    follower_queue,
    join_key,
    model_key,
    task_topology,
    update_key,
    updates_queue,
)

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = REPO / "infra" / "rabbitmq" / "definitions.json"
K8S_DEFINITIONS = REPO / "infra" / "k8s" / "base" / "rabbitmq" / "definitions.json"
DEV_SECRETS = REPO / "infra" / "secrets" / "dev"
HOST = "127.0.0.1"
AMQP_PORT = 5672
MANAGEMENT = f"http://{HOST}:15672"
VHOST = "fedmq"
TASK = "pneumonia"
TRAINER = "trainer-site-0"
OTHER_TRAINER = "trainer-site-1"
PLUGIN_START_TIMEOUT_S = 60.0
STATS_TIMEOUT_S = 15.0
"""The management API reports a queue's policy with its periodic stats."""
ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: a broker test must not skip)")
    pytest.skip(reason)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _api(method: str, path: str, body: object | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{MANAGEMENT}/api/{path}", data=data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def _enable_management() -> None:
    if _port_open(15672):
        return
    if shutil.which("rabbitmq-plugins") is None:
        _unavailable("the management API is off and rabbitmq-plugins is not installed")
    enabled = subprocess.run(
        ["rabbitmq-plugins", "enable", "rabbitmq_management"], capture_output=True, text=True
    )
    if enabled.returncode != 0:
        _unavailable(f"could not enable rabbitmq_management: {enabled.stderr.strip()}")
    deadline = time.monotonic() + PLUGIN_START_TIMEOUT_S
    while not _port_open(15672):
        if time.monotonic() > deadline:
            pytest.fail("rabbitmq_management enabled but port 15672 never opened")
        time.sleep(0.5)


def _password(user: str) -> str:
    folder = DEV_SECRETS / "trainers" if user.startswith("trainer-") else DEV_SECRETS
    return (folder / user).read_text().strip()


@pytest.fixture(scope="module")
def definitions() -> Iterator[dict[str, Any]]:
    if not _port_open(AMQP_PORT):
        _unavailable(f"no RabbitMQ on {HOST}:{AMQP_PORT}")
    _enable_management()
    document = json.loads(DEFINITIONS.read_text())
    _api("POST", "definitions", document)
    yield document
    quoted = urllib.parse.quote(VHOST, safe="")
    _api("DELETE", f"vhosts/{quoted}")
    for user in document["users"]:
        try:
            _api("DELETE", f"users/{urllib.parse.quote(user['name'], safe='')}")
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise


Opener = Callable[[str], BlockingChannel]


@pytest.fixture
def channel_as(definitions: dict[str, Any]) -> Iterator[Opener]:
    """Open a confirm-mode channel on vhost `fedmq` logged in as a definitions user."""
    connections: list[pika.BlockingConnection] = []

    def open_channel(user: str) -> BlockingChannel:
        credentials = pika.PlainCredentials(user, _password(user))
        parameters = pika.ConnectionParameters(HOST, AMQP_PORT, VHOST, credentials)
        connection = pika.BlockingConnection(parameters)
        connections.append(connection)
        channel = connection.channel()
        channel.confirm_delivery()
        return channel

    yield open_channel
    for connection in connections:
        if connection.is_open:
            connection.close()


def _declare(channel: BlockingChannel, queue: QueueSpec) -> None:
    channel.queue_declare(
        queue.name,
        durable=queue.durable,
        exclusive=queue.exclusive,
        auto_delete=queue.auto_delete,
        arguments=dict(queue.arguments),
    )
    for binding in queue.bindings:
        channel.queue_bind(queue.name, binding.exchange, binding.routing_key)


def _refused(action: Callable[[], object]) -> str:
    with pytest.raises(ChannelClosedByBroker) as closed:
        action()
    assert closed.value.reply_code == ACCESS_REFUSED, closed.value
    return str(closed.value.reply_text)


def test_definitions_create_the_task_queues_with_their_policies(
    definitions: dict[str, Any],
) -> None:
    # Given definitions.json loaded through the management API
    # When the broker lists the vhost's queues (policies show once the stats caught up)
    deadline = time.monotonic() + STATS_TIMEOUT_S
    while True:
        queues = {q["name"]: q for q in _api("GET", f"queues/{VHOST}")}
        if all("policy" in q for q in queues.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Then the task's queues exist, and the updates queue dead-letters through its policy
    assert set(queues) >= {q["name"] for q in definitions["queues"]}
    updates = queues[updates_queue(TASK)]
    assert updates.get("policy") == "fedmq-updates"
    assert updates["effective_policy_definition"]["dead-letter-exchange"] == "fedmq.dlx"
    assert updates["arguments"]["x-dead-letter-exchange"] == "fedmq.dlx"


def test_trainer_publishes_its_update_which_reaches_the_aggregators_queue(
    channel_as: Opener,
) -> None:
    # Given trainer-site-0 logged in with its dev password
    trainer = channel_as(TRAINER)
    body = f"update-{time.time_ns()}".encode()
    # When it publishes an update under its own routing key and user id
    trainer.basic_publish(
        UPDATES_EXCHANGE,
        update_key(TASK, TRAINER),
        body,
        pika.BasicProperties(user_id=TRAINER, delivery_mode=2),
        mandatory=True,
    )
    # Then the aggregator reads exactly that message from the task's updates queue
    aggregator = channel_as("aggregator")
    method, properties, received = aggregator.basic_get(updates_queue(TASK), auto_ack=True)
    assert method is not None, "the update did not reach fedmq.pneumonia.updates"
    assert received == body
    assert properties.user_id == TRAINER


def test_trainer_is_refused_consuming_the_updates_queue(channel_as: Opener) -> None:
    trainer = channel_as(TRAINER)
    text = _refused(lambda: trainer.basic_get(updates_queue(TASK)))
    assert updates_queue(TASK) in text


def test_trainer_is_refused_publishing_a_model(channel_as: Opener) -> None:
    trainer = channel_as(TRAINER)
    text = _refused(lambda: trainer.basic_publish(MODELS_EXCHANGE, model_key(TASK), b"forged"))
    assert f"exchange '{MODELS_EXCHANGE}'" in text


def test_trainer_is_refused_reading_another_trainers_follower_queue(channel_as: Opener) -> None:
    # Given trainer-site-1 declared its own follower queue (as the trainer does)
    other = follower_queue(TASK, OTHER_TRAINER)
    _declare(channel_as(OTHER_TRAINER), other)
    # When trainer-site-0 tries to read it, Then the broker refuses
    text = _refused(lambda: channel_as(TRAINER).basic_get(other.name))
    assert other.name in text
    # ... and it may not declare (configure) that queue either
    _refused(lambda: _declare(channel_as(TRAINER), other))


def test_trainer_is_refused_publishing_an_update_as_another_trainer(channel_as: Opener) -> None:
    trainer = channel_as(TRAINER)
    key = update_key(TASK, OTHER_TRAINER)
    text = _refused(lambda: trainer.basic_publish(UPDATES_EXCHANGE, key, b"impersonation"))
    assert f"topic '{key}'" in text


def test_broker_refuses_a_user_id_that_is_not_the_login(channel_as: Opener) -> None:
    trainer = channel_as(TRAINER)
    with pytest.raises(ChannelClosedByBroker) as closed:
        trainer.basic_publish(
            UPDATES_EXCHANGE,
            update_key(TASK, TRAINER),
            b"spoofed",
            pika.BasicProperties(user_id=OTHER_TRAINER),
        )
    assert closed.value.reply_code == PRECONDITION_FAILED


def test_trainer_may_follow_only_its_tasks_models(channel_as: Opener) -> None:
    # Given the trainer's own follower queue, declared and bound with its own permissions
    own = follower_queue(TASK, TRAINER)
    _declare(channel_as(TRAINER), own)
    # When it binds that queue to every model key, Then the topic permission refuses it
    text = _refused(lambda: channel_as(TRAINER).queue_bind(own.name, MODELS_EXCHANGE, "#"))
    assert "topic '#'" in text
    # ... and it may not declare the shared exchanges (configure would allow deleting them)
    _refused(lambda: channel_as(TRAINER).exchange_declare(UPDATES_EXCHANGE, "topic", durable=True))


def test_join_rpc_round_trip_works_with_least_privilege(channel_as: Opener) -> None:
    # Given a trainer consuming its direct reply-to pseudo queue
    trainer = channel_as(TRAINER)
    replies: list[bytes] = []
    trainer.basic_consume(
        "amq.rabbitmq.reply-to", lambda _ch, _m, _p, body: replies.append(body), auto_ack=True
    )
    # When it sends a join request and the aggregator answers on the reply-to address
    trainer.basic_publish(
        CONTROL_EXCHANGE,
        join_key(TASK),
        b"join",
        pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", user_id=TRAINER),
    )
    aggregator = channel_as("aggregator")
    method, properties, body = aggregator.basic_get(f"fedmq.{TASK}.control", auto_ack=True)
    assert method is not None and body == b"join"
    aggregator.basic_publish("", properties.reply_to, b"accepted")
    # Then the trainer receives the reply
    deadline = time.monotonic() + 10
    while not replies and time.monotonic() < deadline:
        trainer.connection.process_data_events(time_limit=0.2)
    assert replies == [b"accepted"]


def test_services_declare_what_their_code_declares_with_their_own_permissions(
    channel_as: Opener,
) -> None:
    # Given the aggregator's topology (shared + task queues + its events queue)
    aggregator = channel_as("aggregator")
    topology = task_topology(TASK)
    # When it declares all of it, and the evaluator and a trainer declare their followers
    for exchange in topology.exchanges:
        aggregator.exchange_declare(exchange.name, exchange.type, durable=exchange.durable)
    for queue in (*topology.queues, events_queue("aggregator", TASK)):
        _declare(aggregator, queue)
    evaluator_queue = follower_queue(TASK, "evaluator")
    _declare(channel_as("evaluator"), evaluator_queue)
    _declare(channel_as(TRAINER), follower_queue(TASK, TRAINER))
    aggregator.basic_publish(MODELS_EXCHANGE, model_key(TASK), b"model-v1")
    aggregator.basic_publish(EVENTS_EXCHANGE, f"model.published.{TASK}", b"event")
    # Then the published model reaches the evaluator's follower queue
    evaluator = channel_as("evaluator")
    method, _properties, body = evaluator.basic_get(evaluator_queue.name, auto_ack=True)
    assert method is not None and body == b"model-v1"


def test_evaluator_is_refused_publishing_updates(channel_as: Opener) -> None:
    evaluator = channel_as("evaluator")
    text = _refused(
        lambda: evaluator.basic_publish(UPDATES_EXCHANGE, update_key(TASK, "evaluator"), b"x")
    )
    assert f"exchange '{UPDATES_EXCHANGE}'" in text


def test_production_definitions_create_a_quorum_updates_queue_on_a_real_broker(
    definitions: dict[str, Any],
) -> None:
    # Given the Kubernetes topology and policies, imported into a vhost of their own
    document = json.loads(K8S_DEFINITIONS.read_text())
    vhost = f"fedmq-quorum-{uuid.uuid4().hex[:8]}"
    topology = {key: document[key] for key in ("exchanges", "queues", "bindings", "policies")}
    quoted = urllib.parse.quote(vhost, safe="")
    _api("PUT", f"vhosts/{quoted}", {})
    try:
        _api("POST", f"definitions/{quoted}", topology)
        # When the broker describes the updates queue
        queue = _api("GET", f"queues/{quoted}/{urllib.parse.quote(updates_queue(TASK))}")
        # Then it is a replicated quorum queue with fedmq's back-pressure arguments
        assert queue["type"] == "quorum"
        assert queue["arguments"]["x-overflow"] == "reject-publish"
        assert queue["arguments"]["x-dead-letter-exchange"] == "fedmq.dlx"
    finally:
        _api("DELETE", f"vhosts/{quoted}")
