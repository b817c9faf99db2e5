"""RabbitMQ definitions (compose and Kubernetes) against `services.common.topology`.

Same exchanges, queues, bindings and effective arguments as the code declares; password
hashes that verify; permission regexes that match what each user needs and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from schemas import DEFAULT_MAX_MESSAGE_BYTES
from services.aggregator.task import load_task
from services.common.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    MODELS_EXCHANGE,
    UPDATES_EXCHANGE,
    QueueType,
    Topology,
    control_queue,
    events_queue,
    follower_queue,
    follower_queue_name,
    join_key,
    model_key,
    task_topology,
    update_key,
    updates_queue,
)

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DEFINITIONS = REPO / "infra" / "rabbitmq" / "definitions.json"
K8S_DEFINITIONS = REPO / "infra" / "k8s" / "base" / "rabbitmq" / "definitions.json"
DEV_SECRETS = REPO / "infra" / "secrets" / "dev"
TASK = "pneumonia"
VHOST = "fedmq"
TRAINERS = [f"trainer-site-{i}" for i in range(8)]
# RabbitMQ applies the lower value when a queue argument and its policy both set these.
LOWER_WINS = {"max-length", "max-length-bytes", "message-ttl", "expires"}
POLICY_KEY = {
    "x-dead-letter-exchange": "dead-letter-exchange",
    "x-max-length": "max-length",
    "x-max-length-bytes": "max-length-bytes",
    "x-overflow": "overflow",
    "x-message-ttl": "message-ttl",
    "x-expires": "expires",
}
VARIANTS = [(COMPOSE_DEFINITIONS, "classic"), (K8S_DEFINITIONS, "quorum")]


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def _generator() -> ModuleType:
    path = REPO / "infra" / "rabbitmq" / "generate_definitions.py"
    spec = importlib.util.spec_from_file_location("generate_definitions", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _password(user: str) -> str:
    folder = DEV_SECRETS / "trainers" if user.startswith("trainer-") else DEV_SECRETS
    return (folder / user).read_text().strip()


def _verifies(password_hash: str, password: str) -> bool:
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def _policy_for(definitions: dict[str, Any], queue: str) -> dict[str, Any] | None:
    """The policy RabbitMQ applies to `queue`: the highest-priority match (re:run = search)."""
    matches = [
        p
        for p in definitions["policies"]
        if p["apply-to"] in ("queues", "all") and re.search(p["pattern"], queue)
    ]
    return max(matches, key=lambda p: p["priority"], default=None)


def _effective(arguments: dict[str, Any], policy: dict[str, Any] | None) -> dict[str, Any]:
    """Arguments as RabbitMQ applies them, in policy vocabulary (queue type left out)."""
    effective = {POLICY_KEY[k]: v for k, v in arguments.items() if k in POLICY_KEY}
    for key, value in (policy or {}).get("definition", {}).items():
        if key not in effective:
            effective[key] = value
        elif key in LOWER_WINS:
            effective[key] = min(effective[key], value)
    return effective


def _expected(queue_type: QueueType) -> Topology:
    return task_topology(TASK, queue_type=queue_type)


@pytest.mark.parametrize(("path", "queue_type"), VARIANTS)
def test_definitions_declare_the_same_exchanges_as_the_code(
    path: Path, queue_type: QueueType
) -> None:
    definitions = _load(path)
    declared = {(e["name"], e["type"], e["durable"]) for e in definitions["exchanges"]}
    expected = {(e.name, e.type, e.durable) for e in _expected(queue_type).exchanges}
    assert declared == expected
    assert all(e["vhost"] == VHOST and not e["auto_delete"] for e in definitions["exchanges"])


@pytest.mark.parametrize(("path", "queue_type"), VARIANTS)
def test_definitions_declare_the_task_queues_with_the_codes_arguments(
    path: Path, queue_type: QueueType
) -> None:
    definitions = _load(path)
    declared = {q["name"]: q for q in definitions["queues"]}
    expected = {q.name: q for q in _expected(queue_type).queues}
    assert set(declared) == set(expected) == {updates_queue(TASK), control_queue(TASK), DEAD_QUEUE}
    for name, spec in expected.items():
        queue = declared[name]
        assert queue["vhost"] == VHOST
        assert (queue["durable"], queue["auto_delete"]) == (spec.durable, spec.auto_delete)
        # The code re-declares these queues: any argument difference is PRECONDITION_FAILED.
        assert queue["arguments"] == dict(spec.arguments), name


@pytest.mark.parametrize(("path", "queue_type"), VARIANTS)
def test_policies_leave_every_queues_effective_limits_as_the_code_declares_them(
    path: Path, queue_type: QueueType
) -> None:
    definitions = _load(path)
    queues = [*_expected(queue_type).queues, follower_queue(TASK, TRAINERS[3])]
    queues.append(follower_queue(TASK, "evaluator"))
    for spec in queues:
        policy = _policy_for(definitions, spec.name)
        assert policy is not None, f"no policy bounds {spec.name}"
        arguments = dict(spec.arguments)
        assert _effective(arguments, policy) == _effective(arguments, None), spec.name
        # ... and the policy alone (a queue declared without arguments) bounds it the same.
        assert _effective({}, policy) == _effective(arguments, None), spec.name


def test_updates_queue_dead_letters_to_the_dlx_through_its_policy() -> None:
    policy = _policy_for(_load(COMPOSE_DEFINITIONS), updates_queue(TASK))
    assert policy is not None
    assert policy["definition"]["dead-letter-exchange"] == DEAD_LETTER_EXCHANGE
    assert policy["definition"]["overflow"] == "reject-publish"


def test_production_definitions_make_the_updates_queue_a_quorum_queue() -> None:
    queues = {q["name"]: q for q in _load(K8S_DEFINITIONS)["queues"]}
    assert queues[updates_queue(TASK)]["arguments"]["x-queue-type"] == "quorum"
    compose = {q["name"]: q for q in _load(COMPOSE_DEFINITIONS)["queues"]}
    assert compose[updates_queue(TASK)]["arguments"]["x-queue-type"] == "classic"


@pytest.mark.parametrize(("path", "queue_type"), VARIANTS)
def test_definitions_bind_the_queues_as_the_code_does(path: Path, queue_type: QueueType) -> None:
    definitions = _load(path)
    declared = {
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in definitions["bindings"]
    }
    expected = {
        (b.exchange, q.name, "queue", b.routing_key)
        for q in _expected(queue_type).queues
        for b in q.bindings
    }
    assert declared == expected


@pytest.mark.parametrize(("path", "_queue_type"), VARIANTS)
def test_every_user_has_a_sha256_hash_of_its_dev_password(path: Path, _queue_type: str) -> None:
    users = {u["name"]: u for u in _load(path)["users"]}
    assert set(users) == {"fedmq-admin", "aggregator", "evaluator", *TRAINERS}
    for name, user in users.items():
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert _verifies(user["password_hash"], _password(name)), name
        assert not _verifies(user["password_hash"], _password(name) + "x")
    assert users["fedmq-admin"]["tags"] == ["administrator"]
    assert all(users[t]["tags"] == [] for t in TRAINERS)


def test_committed_definitions_are_what_the_generator_writes() -> None:
    generator = _generator()
    passwords = generator.read_passwords(DEV_SECRETS, generator.all_users(len(TRAINERS)))
    for path, queue_type in VARIANTS:
        built = generator.build_definitions(
            passwords=passwords, queue_type=queue_type, salt=generator.dev_salt
        )
        assert _load(path) == built, f"{path} is stale: run generate_definitions.py dev"


def test_generated_hash_verifies_with_a_random_salt() -> None:
    generator = _generator()
    first, second = generator.password_hash("s3cret"), generator.password_hash("s3cret")
    assert first != second  # random salts
    assert _verifies(first, "s3cret") and _verifies(second, "s3cret")
    assert len(base64.b64decode(first)) == 4 + 32


# -- permissions -------------------------------------------------------------------------


def _resources() -> set[str]:
    """Every exchange and queue name a fedmq deployment has, plus RabbitMQ's built-ins."""
    topology = task_topology(TASK)
    names = {e.name for e in topology.exchanges} | {q.name for q in topology.queues}
    names |= {follower_queue_name(TASK, who) for who in [*TRAINERS, "evaluator", "trainer-site-10"]}
    names |= {follower_queue_name("other-task", TRAINERS[0])}
    names |= {events_queue("aggregator", TASK).name, events_queue("watcher").name}
    names |= {updates_queue("other-task"), "amq.default", "amq.rabbitmq.reply-to", "amq.topic"}
    return names


def _granted(definitions: dict[str, Any], user: str, what: str) -> set[str]:
    [permission] = [p for p in definitions["permissions"] if p["user"] == user]
    assert permission["vhost"] == VHOST
    return {name for name in _resources() if re.search(permission[what], name)}


@pytest.mark.parametrize("trainer", [TRAINERS[0], TRAINERS[7]])
def test_trainer_may_configure_only_its_own_follower_queue(trainer: str) -> None:
    granted = _granted(_load(COMPOSE_DEFINITIONS), trainer, "configure")
    assert granted == {follower_queue_name(TASK, trainer)}


@pytest.mark.parametrize("trainer", [TRAINERS[0], TRAINERS[7]])
def test_trainer_may_write_only_to_updates_control_events_and_bind_its_queue(trainer: str) -> None:
    granted = _granted(_load(COMPOSE_DEFINITIONS), trainer, "write")
    own = follower_queue_name(TASK, trainer)
    assert granted == {UPDATES_EXCHANGE, CONTROL_EXCHANGE, EVENTS_EXCHANGE, own}


@pytest.mark.parametrize("trainer", [TRAINERS[0], TRAINERS[7]])
def test_trainer_may_read_only_its_follower_queue_and_bind_it_to_models(trainer: str) -> None:
    granted = _granted(_load(COMPOSE_DEFINITIONS), trainer, "read")
    assert granted == {MODELS_EXCHANGE, follower_queue_name(TASK, trainer)}
    assert updates_queue(TASK) not in granted
    assert follower_queue_name(TASK, TRAINERS[1]) not in granted


def test_trainer_topic_permissions_allow_only_its_own_routing_keys() -> None:
    definitions = _load(COMPOSE_DEFINITIONS)
    topics = {
        t["exchange"]: t for t in definitions["topic_permissions"] if t["user"] == TRAINERS[2]
    }
    updates, events = topics[UPDATES_EXCHANGE], topics[EVENTS_EXCHANGE]
    models = topics[MODELS_EXCHANGE]
    assert re.search(updates["write"], update_key(TASK, TRAINERS[2]))
    assert not re.search(updates["write"], update_key(TASK, TRAINERS[3]))
    assert not re.search(updates["write"], update_key("other-task", TRAINERS[2]))
    assert re.search(events["write"], f"heartbeat.{TASK}.{TRAINERS[2]}")
    assert re.search(events["write"], f"trainer.left.{TASK}.{TRAINERS[2]}")
    assert not re.search(events["write"], f"trainer.left.{TASK}.{TRAINERS[3]}")
    assert not re.search(events["write"], f"trainer.left.{TASK}")
    assert not re.search(events["write"], f"heartbeat.{TASK}.{TRAINERS[3]}")
    assert not re.search(events["write"], f"model.published.{TASK}")
    assert re.search(models["read"], model_key(TASK))
    assert not re.search(models["read"], "#")
    assert not re.search(models["read"], model_key("other-task"))


def test_aggregator_may_declare_and_consume_its_topology_and_no_follower_queue() -> None:
    definitions = _load(COMPOSE_DEFINITIONS)
    topology = task_topology(TASK)
    watch = events_queue("aggregator", TASK).name
    own_queues = {updates_queue(TASK), control_queue(TASK), watch}
    assert _granted(definitions, "aggregator", "configure") == (
        {e.name for e in topology.exchanges} | own_queues | {DEAD_QUEUE}
    )
    assert _granted(definitions, "aggregator", "read") == own_queues | {
        UPDATES_EXCHANGE,
        CONTROL_EXCHANGE,
        EVENTS_EXCHANGE,
        DEAD_LETTER_EXCHANGE,
    }
    assert _granted(definitions, "aggregator", "write") == own_queues | {
        MODELS_EXCHANGE,
        EVENTS_EXCHANGE,
        DEAD_LETTER_EXCHANGE,
        DEAD_QUEUE,
        "amq.default",
    }


def test_evaluator_follows_models_and_never_publishes_updates() -> None:
    definitions = _load(COMPOSE_DEFINITIONS)
    own = follower_queue_name(TASK, "evaluator")
    assert _granted(definitions, "evaluator", "configure") == {own}
    assert _granted(definitions, "evaluator", "read") == {MODELS_EXCHANGE, own}
    assert _granted(definitions, "evaluator", "write") == {CONTROL_EXCHANGE, EVENTS_EXCHANGE, own}


def test_routing_keys_the_code_uses_are_those_the_permissions_expect() -> None:
    # The permission regexes above were written for these keys; a rename must show here.
    assert join_key(TASK) == f"join.{TASK}"
    assert update_key(TASK, TRAINERS[0]) == f"update.{TASK}.{TRAINERS[0]}"
    assert model_key(TASK) == f"model.{TASK}"


# -- broker configuration ----------------------------------------------------------------


def _conf(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.strip().startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


@pytest.mark.parametrize("name", ["rabbitmq.conf", "rabbitmq.tls.conf"])
def test_broker_config_loads_the_definitions_and_bounds_message_size_like_fedmq(name: str) -> None:
    conf = _conf(REPO / "infra" / "rabbitmq" / name)
    assert conf["load_definitions"] == "/etc/rabbitmq/definitions.json"
    assert int(conf["max_message_size"]) == DEFAULT_MAX_MESSAGE_BYTES


def test_tls_broker_config_listens_on_amqps_only_and_verifies_peers() -> None:
    conf = _conf(REPO / "infra" / "rabbitmq" / "rabbitmq.tls.conf")
    assert conf["listeners.tcp"] == "none"
    assert conf["listeners.ssl.default"] == "5671"
    assert conf["ssl_options.verify"] == "verify_peer"
    assert conf["ssl_options.cacertfile"].startswith("/etc/rabbitmq/tls/")


@pytest.mark.parametrize(
    ("task_file", "path"),
    [
        (REPO / "infra" / "tasks" / "pneumonia.yaml", COMPOSE_DEFINITIONS),
        (REPO / "infra" / "k8s" / "base" / "task" / "pneumonia.yaml", K8S_DEFINITIONS),
    ],
)
def test_task_file_redeclares_the_updates_queue_exactly_as_the_definitions_do(
    task_file: Path, path: Path
) -> None:
    # The aggregator declares task_topology(task, queue_type, max_update_bytes) at start;
    # a difference from the pre-declared queue is PRECONDITION_FAILED and it cannot start.
    task = load_task(task_file)
    declared = {q["name"]: q["arguments"] for q in _load(path)["queues"]}
    topology = task_topology(
        task.task_id, queue_type=task.queue_type, max_update_bytes=task.max_update_bytes
    )
    for queue in topology.queues:
        assert declared[queue.name] == dict(queue.arguments), (task_file, queue.name)
