"""The stable recipe: what `fedmq aggregator` (and `fedmq demo`) uses unless flags say otherwise.

Chosen on label-skewed sites with stragglers (docs/decisions/0009-stable-recipe.md): every
site trains the same 16 local SGD steps at lr 0.003, and FedBuff folds 4 updates into one
server step of lr 0.5 with uniform weights (each update did the same work, so none gets the
say of its site's size). The shipped task files (infra/tasks, the Kubernetes ConfigMap) say
the same explicitly. Flags override each field; FedAsync and FedAvg keep their own rules
(the strategy fields below apply to FedBuff only).
"""

from __future__ import annotations

from typing import Any

LOCAL_STEPS = 16
"""Batches per local round: about one epoch of an average site; small sites cycle."""
LOCAL_EPOCHS_BOUND = 1000
"""`local_epochs` only bounds the round: `local_steps` ends it, also on a tiny site."""

STABLE_SPEC: dict[str, Any] = {
    "local_epochs": LOCAL_EPOCHS_BOUND,
    "local_steps": LOCAL_STEPS,
    "batch_size": 32,
    "learning_rate": 0.003,
    "optimizer": "sgd",
    "momentum": 0.9,
}
"""Task spec fields (what trainers are told) of the recipe."""

STABLE_FEDBUFF: dict[str, Any] = {
    "name": "fedbuff",
    "buffer_size": 4,
    "staleness": "polynomial",
    "staleness_a": 0.5,
    "sample_weighted": False,
    "server_optimizer": "sgd",
    "server_lr": 0.5,
}
"""Strategy fields of the recipe (FedBuff)."""


def stable_strategy(given: dict[str, Any]) -> dict[str, Any]:
    """The strategy fields `given` by flags laid over the recipe (FedBuff, the default)."""
    if given.get("name", STABLE_FEDBUFF["name"]) != STABLE_FEDBUFF["name"]:
        return dict(given)
    return {**STABLE_FEDBUFF, **given}


def stable_spec(given: dict[str, Any]) -> dict[str, Any]:
    """The spec fields `given` by flags laid over the recipe's local training.

    `--local-epochs` alone means whole epochs: the recipe's step bound is then dropped.
    """
    spec = {**STABLE_SPEC, **given}
    if "local_epochs" in given and "local_steps" not in given:
        spec["local_steps"] = None
    return spec
