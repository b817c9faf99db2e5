"""Every message kind fedmq sends: frozen pydantic models discriminated by `kind`."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from schemas.tensors import Precision, Tensor

SCHEMA_VERSION = 1
"""Bumped on any change a version-1 reader could not understand."""

IDENTIFIER_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]
"""Task, trainer and service ids: safe inside routing keys and queue names."""

MessageId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
Reason = Annotated[str, Field(min_length=1, max_length=64)]
Detail = Annotated[str, Field(max_length=4096)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Metrics = Annotated[dict[Annotated[str, Field(max_length=64)], FiniteFloat], Field(max_length=32)]
TensorList = Annotated[tuple[Tensor, ...], Field(max_length=4096)]
Signature = Annotated[bytes, Field(min_length=64, max_length=64)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def new_id() -> str:
    """A fresh random id (uuid4 hex) for updates and messages."""
    return uuid.uuid4().hex


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JoinRequest(_Message):
    """A trainer asks to take part in a task (RPC on `fedmq.control`)."""

    kind: Literal["join_request"] = "join_request"
    task_id: Identifier
    trainer_id: Identifier
    num_examples: NonNegativeInt
    role: Literal["trainer", "evaluator"] = "trainer"
    """Evaluators join to learn the task and the current model; they never send updates."""
    sent_at: FiniteFloat = Field(default_factory=time.time)


class TaskSpec(_Message):
    """What a trainer needs to know to train for a task; also the operator's task file."""

    kind: Literal["task_spec"] = "task_spec"
    task_id: Identifier
    model: Annotated[str, Field(min_length=1, max_length=64)]
    num_classes: Annotated[int, Field(ge=2, le=100_000)]
    in_channels: Annotated[int, Field(ge=1, le=16)] = 1
    image_size: Annotated[int, Field(ge=8, le=1024)] = 28
    dataset: Annotated[str, Field(max_length=256)] = "medmnist:pneumoniamnist"
    strategy: Annotated[str, Field(max_length=32)] = "fedbuff"
    synchronous: bool = False
    """True under a round barrier: a trainer trains once per model version."""
    local_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    local_steps: PositiveInt | None = None
    """When set, a local round stops after this many batches even inside an epoch."""
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    logit_adjustment: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    """tau of the logit-adjusted loss: each site trains on `logits + tau * log(its own class
    prior)`, so no site's label mix is learnt into the shared model (0: plain cross-entropy)."""
    precision: Precision = "float32"
    fedbn: bool = False
    max_update_norm: Annotated[float, Field(gt=0.0)] | None = None
    heartbeat_interval: Annotated[float, Field(gt=0.0, le=3600.0)] = 5.0
    signatures_required: bool = False
    seed: NonNegativeInt = 0


class GlobalModel(_Message):
    """One version of the global model, published on `fedmq.models`."""

    kind: Literal["global_model"] = "global_model"
    task_id: Identifier
    version: NonNegativeInt
    tensors: TensorList
    updates_applied: NonNegativeInt = 0
    published_at: FiniteFloat = Field(default_factory=time.time)


class JoinAccepted(_Message):
    """The aggregator's reply to a `JoinRequest`: the task and the current model."""

    kind: Literal["join_accepted"] = "join_accepted"
    spec: TaskSpec
    model: GlobalModel


class ModelUpdate(_Message):
    """A trainer's local result: `delta` = local weights minus the weights of `base_version`."""

    kind: Literal["model_update"] = "model_update"
    update_id: MessageId = Field(default_factory=new_id)
    task_id: Identifier
    trainer_id: Identifier
    base_version: NonNegativeInt
    num_examples: PositiveInt
    delta: Annotated[TensorList, Field(min_length=1)]
    metrics: Metrics = Field(default_factory=dict)
    created_at: FiniteFloat = Field(default_factory=time.time)
    signature: Signature | None = None


class Heartbeat(_Message):
    """A service says it is alive and what it is doing (`heartbeat.<task>.<sender>`)."""

    kind: Literal["heartbeat"] = "heartbeat"
    task_id: Identifier
    sender_id: Identifier
    role: Literal["trainer", "aggregator", "evaluator"]
    state: Annotated[str, Field(max_length=32)] = "running"
    model_version: NonNegativeInt | None = None
    updates_sent: NonNegativeInt = 0
    sent_at: FiniteFloat = Field(default_factory=time.time)


class TrainerJoined(_Message):
    """Event: the aggregator accepted a trainer into a task."""

    kind: Literal["trainer_joined"] = "trainer_joined"
    task_id: Identifier
    trainer_id: Identifier
    num_examples: NonNegativeInt
    joined_at: FiniteFloat = Field(default_factory=time.time)


class TrainerLeft(_Message):
    """A trainer left (it said so, or the aggregator stopped hearing its heartbeats)."""

    kind: Literal["trainer_left"] = "trainer_left"
    task_id: Identifier
    trainer_id: Identifier
    reason: Literal["shutdown", "heartbeat-timeout", "error"] = "shutdown"
    detail: Detail = ""
    updates_sent: NonNegativeInt = 0
    left_at: FiniteFloat = Field(default_factory=time.time)


class ModelPublished(_Message):
    """Event: a new global version exists, with the aggregator's running totals."""

    kind: Literal["model_published"] = "model_published"
    task_id: Identifier
    version: NonNegativeInt
    updates_applied: NonNegativeInt
    updates_rejected: NonNegativeInt
    mean_staleness: Annotated[float, Field(ge=0.0)] = 0.0
    active_trainers: NonNegativeInt = 0
    epsilon: Annotated[float, Field(ge=0.0)] | None = None
    published_at: FiniteFloat = Field(default_factory=time.time)


class EvalReport(_Message):
    """The evaluator's verdict on one model version (held-out split)."""

    kind: Literal["eval_report"] = "eval_report"
    task_id: Identifier
    version: NonNegativeInt
    split: Literal["train", "val", "test"] = "test"
    loss: FiniteFloat
    accuracy: Probability
    auc: Probability | None = None
    per_class_accuracy: Annotated[tuple[Probability, ...], Field(max_length=100_000)] = ()
    num_examples: PositiveInt
    updates_applied: NonNegativeInt = 0
    model_published_at: FiniteFloat | None = None
    evaluated_at: FiniteFloat = Field(default_factory=time.time)


class Rejection(_Message):
    """Event: a message was dead-lettered, and why."""

    kind: Literal["rejection"] = "rejection"
    reason: Reason
    detail: Detail = ""
    task_id: Identifier | None = None
    trainer_id: Identifier | None = None
    update_id: MessageId | None = None
    message_id: MessageId | None = None
    rejected_at: FiniteFloat = Field(default_factory=time.time)


Message = Annotated[
    JoinRequest
    | TaskSpec
    | GlobalModel
    | JoinAccepted
    | ModelUpdate
    | Heartbeat
    | TrainerJoined
    | TrainerLeft
    | ModelPublished
    | EvalReport
    | Rejection,
    Field(discriminator="kind"),
]
"""Any fedmq message; pydantic picks the class from `kind`."""

MESSAGE_TYPES: dict[str, type[BaseModel]] = {
    cls.model_fields["kind"].default: cls
    for cls in (
        JoinRequest,
        TaskSpec,
        GlobalModel,
        JoinAccepted,
        ModelUpdate,
        Heartbeat,
        TrainerJoined,
        TrainerLeft,
        ModelPublished,
        EvalReport,
        Rejection,
    )
}
