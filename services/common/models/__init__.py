"""Model zoo (torchvision based) and conversions between weights and numpy arrays."""

from services.common.models.weights import (
    WeightsMismatch,
    load_state_arrays,
    state_arrays,
    state_entries,
)
from services.common.models.zoo import (
    SMALL_IMAGE_MAX,
    UnknownModel,
    available_models,
    batchnorm_prefixes,
    build_model,
    default_input,
    parameter_count,
)

__all__ = [
    "SMALL_IMAGE_MAX",
    "UnknownModel",
    "WeightsMismatch",
    "available_models",
    "batchnorm_prefixes",
    "build_model",
    "default_input",
    "load_state_arrays",
    "parameter_count",
    "state_arrays",
    "state_entries",
]
