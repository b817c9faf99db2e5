"""The wire contract of fedmq: message kinds, tensor payloads and the msgpack codec.

No I/O and no torch here: both ends of every queue import this and nothing else to agree.
"""

from schemas.codec import (
    CONTENT_TYPE,
    SCHEMA_HEADER,
    check_envelope,
    decode,
    encode,
    signing_bytes,
)
from schemas.errors import DecodeError, DecodeReason
from schemas.limits import DEFAULT_MAX_MESSAGE_BYTES, DecodeLimits
from schemas.messages import (
    SCHEMA_VERSION,
    EvalReport,
    GlobalModel,
    Heartbeat,
    JoinAccepted,
    JoinRequest,
    Message,
    ModelPublished,
    ModelUpdate,
    Rejection,
    TaskSpec,
    TrainerJoined,
    TrainerLeft,
    new_id,
)
from schemas.tensors import Precision, Tensor

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SCHEMA_HEADER",
    "SCHEMA_VERSION",
    "DecodeError",
    "DecodeLimits",
    "DecodeReason",
    "EvalReport",
    "GlobalModel",
    "Heartbeat",
    "JoinAccepted",
    "JoinRequest",
    "Message",
    "ModelPublished",
    "ModelUpdate",
    "Precision",
    "Rejection",
    "TaskSpec",
    "Tensor",
    "TrainerJoined",
    "TrainerLeft",
    "check_envelope",
    "decode",
    "encode",
    "new_id",
    "signing_bytes",
]
