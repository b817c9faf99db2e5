"""Build the aggregator's starting state: the newest checkpoint, or fresh weights from the zoo."""

from __future__ import annotations

import numpy as np
import structlog

from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.core import AggregatorCore
from services.aggregator.layout import ParamLayout
from services.aggregator.strategies.factory import build_strategy
from services.aggregator.task import TaskDefinition

log = structlog.get_logger(__name__)


def initial_layout_and_weights(
    task: TaskDefinition,
) -> tuple[ParamLayout, np.ndarray, dict[str, np.ndarray]]:
    """The model's layout, its flat float weights and its integer buffers, seeded by the task."""
    from services.common.models.weights import state_arrays
    from services.common.models.zoo import batchnorm_prefixes, build_model

    spec = task.spec
    model = build_model(
        spec.model,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        seed=spec.seed,
    )
    arrays = state_arrays(model)
    layout = ParamLayout.from_arrays(arrays, bn_prefixes=batchnorm_prefixes(model))
    integers = {name: np.array(arrays[name]) for name in layout.integer_names}
    return layout, layout.flatten(arrays), integers


def load_core(task: TaskDefinition, store: CheckpointStore) -> AggregatorCore:
    """Resume from the newest checkpoint in `store`, or start at version 0."""
    layout, weights, integers = initial_layout_and_weights(task)
    strategy = build_strategy(task.strategy)
    saved = store.latest()
    if saved is not None:
        log.info("resuming_from_checkpoint", version=saved.version, task=task.task_id)
        return AggregatorCore.restore(task=task, layout=layout, strategy=strategy, saved=saved)
    log.info("starting_fresh", task=task.task_id, model=task.spec.model, size=layout.size)
    return AggregatorCore(
        task=task, layout=layout, weights=weights, integers=integers, strategy=strategy
    )
