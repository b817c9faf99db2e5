"""The declarative topology: names, arguments, bindings, routing keys and id validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import topology as t


def _by_name(topology: t.Topology) -> dict[str, t.QueueSpec]:
    return {q.name: q for q in topology.queues}


def test_shared_topology_declares_the_five_exchanges_with_their_types() -> None:
    # Given / When
    shared = t.shared_topology()
    # Then
    assert {(e.name, e.type, e.durable) for e in shared.exchanges} == {
        ("fedmq.updates", "topic", True),
        ("fedmq.models", "topic", True),
        ("fedmq.control", "direct", True),
        ("fedmq.events", "topic", True),
        ("fedmq.dlx", "fanout", True),
    }


def test_dead_queue_is_bound_to_the_dead_letter_exchange_and_bounded_in_time_and_size() -> None:
    # Given / When
    dead = _by_name(t.shared_topology())["fedmq.dead"]
    # Then
    assert dead.durable
    assert dead.bindings == (t.BindingSpec("fedmq.dlx", ""),)
    assert dead.arguments["x-message-ttl"] == 7 * 24 * 3600 * 1000
    assert dead.arguments["x-max-length"] == t.DEAD_QUEUE_MAX_LENGTH
    assert dead.arguments["x-max-length-bytes"] == t.DEAD_QUEUE_MAX_BYTES
    assert dead.arguments["x-overflow"] == "drop-head"


def test_task_topology_adds_an_updates_queue_with_back_pressure_and_a_dead_letter_exchange() -> (
    None
):
    # Given / When
    updates = _by_name(t.task_topology("mnist-1", max_update_bytes=4096))["fedmq.mnist-1.updates"]
    # Then
    assert updates.durable
    assert updates.bindings == (t.BindingSpec("fedmq.updates", "update.mnist-1.*"),)
    assert dict(updates.arguments) == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "fedmq.dlx",
        "x-max-length-bytes": 4096,
        "x-overflow": "reject-publish",
    }


def test_task_topology_defaults_to_one_gibibyte_of_waiting_updates() -> None:
    updates = _by_name(t.task_topology("mnist-1"))["fedmq.mnist-1.updates"]
    assert updates.arguments["x-max-length-bytes"] == 1024**3 == t.DEFAULT_MAX_UPDATE_BYTES


def test_task_topology_adds_a_control_queue_bound_to_the_join_key() -> None:
    control = _by_name(t.task_topology("mnist-1"))["fedmq.mnist-1.control"]
    assert control.durable
    assert control.bindings == (t.BindingSpec("fedmq.control", "join.mnist-1"),)
    assert control.arguments["x-message-ttl"] == t.CONTROL_MESSAGE_TTL_MS


def test_quorum_task_topology_makes_both_task_queues_quorum_queues() -> None:
    queues = _by_name(t.task_topology("mnist-1", queue_type="quorum"))
    assert queues["fedmq.mnist-1.updates"].arguments["x-queue-type"] == "quorum"
    assert queues["fedmq.mnist-1.control"].arguments["x-queue-type"] == "quorum"


def test_task_topology_includes_the_shared_topology() -> None:
    task = t.task_topology("mnist-1")
    assert set(t.shared_topology().exchanges) <= set(task.exchanges)
    assert t.DEAD_QUEUE in _by_name(task)


@pytest.mark.parametrize("bad", [0, -1])
def test_task_topology_refuses_a_non_positive_byte_limit(bad: int) -> None:
    with pytest.raises(ValueError, match="max_update_bytes"):
        t.task_topology("mnist-1", max_update_bytes=bad)


def test_follower_queue_keeps_only_the_newest_model_and_expires_when_abandoned() -> None:
    # Given / When
    follower = t.follower_queue("mnist-1", "site-a")
    # Then
    assert follower.name == "fedmq.mnist-1.follow.site-a"
    assert follower.durable and not follower.exclusive
    assert follower.bindings == (t.BindingSpec("fedmq.models", "model.mnist-1"),)
    assert dict(follower.arguments) == {
        "x-max-length": 1,
        "x-overflow": "drop-head",
        "x-expires": 24 * 3600 * 1000,
    }


def test_events_queue_for_a_task_matches_every_event_key_of_that_task_only() -> None:
    # Given
    from services.common.bus.memory import topic_matches

    patterns = [b.routing_key for b in t.events_queue("watcher", "mnist-1").bindings]
    task_keys = [
        t.event_key("heartbeat", "mnist-1", "site-a"),
        t.event_key("trainer.joined", "mnist-1"),
        t.event_key("trainer.left", "mnist-1", "site-a"),
        t.event_key("model.published", "mnist-1"),
        t.event_key("eval", "mnist-1"),
        t.event_key("update.rejected", "mnist-1"),
    ]
    other_keys = [
        t.event_key("eval", "other"),
        t.event_key("heartbeat", "other", "mnist-1"),
        t.event_key("trainer.left", "other", "mnist-1"),
    ]
    # Then
    assert all(any(topic_matches(p, key) for p in patterns) for key in task_keys)
    assert not any(topic_matches(p, key) for p in patterns for key in other_keys)


def test_routing_keys_follow_the_design_table() -> None:
    assert t.update_key("mnist-1", "site-a") == "update.mnist-1.site-a"
    assert t.model_key("mnist-1") == "model.mnist-1"
    assert t.join_key("mnist-1") == "join.mnist-1"
    assert t.event_key("heartbeat", "mnist-1", "site-a") == "heartbeat.mnist-1.site-a"
    assert t.event_key("trainer.joined", "mnist-1") == "trainer.joined.mnist-1"
    assert t.event_key("trainer.left", "mnist-1", "site-a") == "trainer.left.mnist-1.site-a"
    assert t.event_key("model.published", "mnist-1") == "model.published.mnist-1"
    assert t.event_key("eval", "mnist-1") == "eval.mnist-1"
    assert t.event_key("update.rejected", "mnist-1") == "update.rejected.mnist-1"


def test_heartbeat_key_needs_a_sender_and_other_events_refuse_one() -> None:
    with pytest.raises(ValueError, match="who"):
        t.event_key("heartbeat", "mnist-1")
    with pytest.raises(ValueError, match="who"):
        t.event_key("eval", "mnist-1", "site-a")


@pytest.mark.parametrize(
    "bad", ["", "a.b", "a*", "a#", "with space", "x" * 65, "é", "a/b", "update.x.*"]
)
def test_ids_outside_the_allowed_alphabet_are_refused_with_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match=r"invalid task id .*letters, digits"):
        t.task_topology(bad)
    with pytest.raises(ValueError, match="invalid trainer id"):
        t.update_key("ok", bad)
    with pytest.raises(ValueError, match="invalid follower id"):
        t.follower_queue("ok", bad)


@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_every_valid_id_yields_a_three_word_update_key_ending_in_that_id(trainer: str) -> None:
    key = t.update_key("task", trainer)
    assert key.split(".") == ["update", "task", trainer]


def test_merging_identical_specs_keeps_one_copy() -> None:
    # Given two task topologies that both contain the shared one
    merged = t.task_topology("a").merge(t.task_topology("b"))
    # Then each exchange and the dead queue appear once
    names = [q.name for q in merged.queues]
    assert len(merged.exchanges) == 5
    assert names.count("fedmq.dead") == 1
    assert {"fedmq.a.updates", "fedmq.b.updates", "fedmq.a.control", "fedmq.b.control"} <= set(
        names
    )


def test_merging_two_different_specs_under_one_name_is_refused() -> None:
    small = t.task_topology("a", max_update_bytes=10)
    large = t.task_topology("a", max_update_bytes=20)
    with pytest.raises(ValueError, match=r"fedmq\.a\.updates"):
        small.merge(large)


def test_a_topology_cannot_hold_one_name_twice_with_different_settings() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        t.Topology(exchanges=(t.ExchangeSpec("x", "topic"), t.ExchangeSpec("x", "direct")))


def test_queue_spec_arguments_are_a_read_only_copy() -> None:
    # Given a spec built from a mutable dict
    arguments: dict[str, object] = {"x-max-length": 1}
    spec = t.QueueSpec("q", durable=True, arguments=arguments)
    # When the dict changes afterwards
    arguments["x-max-length"] = 99
    # Then the spec is unaffected and cannot be changed through its mapping
    assert spec.arguments["x-max-length"] == 1
    with pytest.raises(TypeError):
        spec.arguments["x-max-length"] = 2  # type: ignore[index]


def test_a_task_watch_queue_can_be_narrowed_to_the_events_its_consumer_handles() -> None:
    queue = t.events_queue("aggregator", "mnist-1", events=("heartbeat", "trainer.left"))
    patterns = [b.routing_key for b in queue.bindings]
    assert patterns == ["heartbeat.mnist-1.*", "trainer.left.mnist-1.*"]
    assert queue.name == t.events_queue("aggregator", "mnist-1").name


def test_narrowing_a_watch_queue_refuses_unknown_events_and_the_all_tasks_queue() -> None:
    with pytest.raises(ValueError, match="unknown events"):
        t.events_queue("aggregator", "mnist-1", events=("model.deleted",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task_id"):
        t.events_queue("watcher", events=("heartbeat",))


def test_a_quorum_follower_queue_keeps_the_same_limits_and_is_replicated() -> None:
    # Given / When
    follower = t.follower_queue("mnist-1", "site-a", queue_type="quorum")
    # Then
    assert follower.durable
    assert dict(follower.arguments) == {
        "x-queue-type": "quorum",
        "x-max-length": 1,
        "x-overflow": "drop-head",
        "x-expires": 24 * 3600 * 1000,
    }
    assert t.own_follower_topology("mnist-1", "site-a", queue_type="quorum").queues == (follower,)


def test_a_quorum_task_replicates_its_dead_letter_queue_too() -> None:
    # Given / When
    queues = _by_name(t.task_topology("mnist-1", queue_type="quorum"))
    classic = _by_name(t.task_topology("mnist-1"))
    # Then the dead letters survive a node loss like the updates do; classic stays as it was
    assert queues["fedmq.dead"].arguments["x-queue-type"] == "quorum"
    assert queues["fedmq.mnist-1.updates"].arguments["x-queue-type"] == "quorum"
    assert "x-queue-type" not in classic["fedmq.dead"].arguments


def test_an_unknown_follower_queue_type_is_refused() -> None:
    with pytest.raises(ValueError, match="queue_type"):
        t.follower_queue("mnist-1", "site-a", queue_type="stream")  # type: ignore[arg-type]
