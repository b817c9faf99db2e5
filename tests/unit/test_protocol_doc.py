"""docs/protocol.md names every message field, dead-letter reason and queue the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas import DecodeReason
from schemas.messages import MESSAGE_TYPES, SCHEMA_VERSION
from schemas.tensors import ITEMSIZE
from services.aggregator.poison import POISON_REASON
from services.aggregator.service import BAD_REPLY_TO_REASON
from services.aggregator.strategies.base import Rejection as StrategyReason
from services.aggregator.validation import RejectReason
from services.common.bus.base import DIRECT_REPLY_TO, HANDLER_ERROR_REASON
from services.common.topology import (
    DETAIL_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    ORIGINAL_USER_ID_HEADER,
    REASON_HEADER,
    events_queue,
    follower_queue,
    task_topology,
)
from services.trainer.follower import WRONG_TASK_REASON

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def text() -> str:
    return PROTOCOL.read_text()


def _section_of_kind(text: str, kind: str) -> str:
    start = text.index(f"### `{kind}`")
    end = text.find("\n### ", start + 1)
    return text[start : end if end != -1 else None]


def _reason_table(text: str) -> set[str]:
    start = text.index("### 11.2")
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text[start:], flags=re.MULTILINE)
    return set(rows)


def test_the_document_is_versioned_with_the_schema_number(text: str) -> None:
    assert text.startswith(f"# The fedmq wire protocol, schema version {SCHEMA_VERSION}\n")


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_every_field_of_every_kind_is_documented_in_its_section(text: str, kind: str) -> None:
    # Given the section of one kind
    section = _section_of_kind(text, kind)
    # Then every field of the model is named in it
    fields = [name for name in MESSAGE_TYPES[kind].model_fields if name != "kind"]
    missing = [name for name in fields if f"`{name}`" not in section]
    assert not missing, f"{kind}: fields not documented: {missing}"


def test_every_dead_letter_reason_the_code_gives_is_in_the_reason_table(text: str) -> None:
    # Given every reason fedmq's services can put in x-fedmq-reason
    reasons = {
        *(r.value for r in DecodeReason),
        *(r.value for r in RejectReason),
        *(r.value for r in StrategyReason),
        HANDLER_ERROR_REASON,
        WRONG_TASK_REASON,
        BAD_REPLY_TO_REASON,
        POISON_REASON,
    }
    # Then each has a row saying what the sender should do, and no row is invented
    documented = _reason_table(text)
    assert reasons - documented == set()
    assert documented - reasons == set()


def test_every_dtype_queue_argument_and_header_is_named(text: str) -> None:
    topology = task_topology("t").merge(task_topology("t"))
    queues = [*topology.queues, follower_queue("t", "x"), events_queue("w", "t")]
    names = {
        *ITEMSIZE,
        *(exchange.name for exchange in topology.exchanges),
        *(key for queue in queues for key in queue.arguments),
        REASON_HEADER,
        DETAIL_HEADER,
        ORIGINAL_EXCHANGE_HEADER,
        ORIGINAL_ROUTING_KEY_HEADER,
        ORIGINAL_USER_ID_HEADER,
        DIRECT_REPLY_TO,
        "fedmq.dead",
        "fedmq-schema",
    }
    missing = sorted(name for name in names if f"`{name}" not in text)
    assert not missing


def test_every_queue_argument_is_documented_with_its_value(text: str) -> None:
    # Given the queues a task, a follower and a watcher declare
    queues = [*task_topology("t").queues, follower_queue("t", "x"), events_queue("w", "t")]
    # Then each argument appears with the value the code declares
    for queue in queues:
        for key, value in queue.arguments.items():
            shown = f'`{key}`: `"{value}"`' if isinstance(value, str) else f"`{key}`: {value}"
            assert shown in text, f"{queue.name}: {shown}"
