"""Server-side steps that apply an aggregated delta to the global model (FedOpt, Reddi et al. 2021).

The aggregated delta is a pseudo-gradient pointing the way to move: `x <- x + lr * direction`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np

from services.aggregator.strategies.base import FloatVector, StateDict

ServerOptimizerName = Literal["sgd", "momentum", "adam"]


class ServerOptimizer(ABC):
    """Turns the aggregated delta into a step on the global weights; may keep moments."""

    name: ClassVar[str]

    def __init__(self, *, lr: float) -> None:
        if lr <= 0:
            raise ValueError(f"server learning rate must be > 0, got {lr}")
        self.lr = lr

    @abstractmethod
    def step(self, weights: FloatVector, delta: FloatVector) -> FloatVector:
        """Return new weights (a new array) after applying `delta`; `weights` is not modified."""

    def state_dict(self) -> StateDict:
        """Checkpointable state: the optimizer kind and its moments."""
        return {"kind": self.name}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore what `state_dict` returned."""
        if state.get("kind") != self.name:
            raise ValueError(
                f"state is for server optimizer {state.get('kind')!r}, not {self.name!r}"
            )


class ServerSGD(ServerOptimizer):
    """x <- x + lr * delta (lr 1.0 is plain FedAvg / FedBuff)."""

    name: ClassVar[str] = "sgd"

    def step(self, weights: FloatVector, delta: FloatVector) -> FloatVector:
        """Return new weights (a new array) after applying `delta`."""
        _check_shapes(weights, delta)
        return (weights + np.float32(self.lr) * delta).astype(np.float32, copy=False)


class ServerMomentum(ServerOptimizer):
    """m <- beta m + delta; x <- x + lr m (FedAvgM)."""

    name: ClassVar[str] = "momentum"

    def __init__(self, *, lr: float, beta: float = 0.9) -> None:
        super().__init__(lr=lr)
        _check_beta("beta", beta)
        self.beta = beta
        self._m: FloatVector | None = None

    def step(self, weights: FloatVector, delta: FloatVector) -> FloatVector:
        """Return new weights (a new array) after applying `delta` through the momentum."""
        _check_shapes(weights, delta)
        m = _moment(self._m, weights)
        self._m = (np.float32(self.beta) * m + delta).astype(np.float32, copy=False)
        return (weights + np.float32(self.lr) * self._m).astype(np.float32, copy=False)

    def state_dict(self) -> StateDict:
        """Kind and momentum (an empty array before the first step)."""
        return {**super().state_dict(), "m": _saved(self._m)}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore kind and momentum."""
        super().load_state_dict(state)
        self._m = _restored(state, "m")


class ServerAdam(ServerOptimizer):
    """FedAdam without bias correction: m, v moments; x <- x + lr m / (sqrt(v) + tau)."""

    name: ClassVar[str] = "adam"

    def __init__(
        self, *, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr=lr)
        _check_beta("beta1", beta1)
        _check_beta("beta2", beta2)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self._m: FloatVector | None = None
        self._v: FloatVector | None = None

    def step(self, weights: FloatVector, delta: FloatVector) -> FloatVector:
        """Return new weights (a new array) after one adaptive step."""
        _check_shapes(weights, delta)
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        m = b1 * _moment(self._m, weights) + (np.float32(1) - b1) * delta
        v = b2 * _moment(self._v, weights) + (np.float32(1) - b2) * np.square(delta)
        self._m, self._v = m.astype(np.float32), v.astype(np.float32)
        step = np.float32(self.lr) * self._m / (np.sqrt(self._v) + np.float32(self.tau))
        return (weights + step).astype(np.float32, copy=False)

    def state_dict(self) -> StateDict:
        """Kind and both moments (empty arrays before the first step)."""
        return {**super().state_dict(), "m": _saved(self._m), "v": _saved(self._v)}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore kind and moments."""
        super().load_state_dict(state)
        self._m = _restored(state, "m")
        self._v = _restored(state, "v")


def server_optimizer(
    name: ServerOptimizerName,
    *,
    lr: float,
    momentum: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> ServerOptimizer:
    """Build a server optimizer by name; `momentum` is beta (momentum) or beta1 (adam)."""
    if name == "sgd":
        return ServerSGD(lr=lr)
    if name == "momentum":
        return ServerMomentum(lr=lr, beta=momentum)
    if name == "adam":
        return ServerAdam(lr=lr, beta1=momentum, beta2=beta2, tau=tau)
    raise ValueError(f"unknown server optimizer {name!r} (sgd, momentum, adam)")


def _check_beta(label: str, beta: float) -> None:
    if not 0 <= beta < 1:
        raise ValueError(f"{label} must be in [0, 1), got {beta}")


def _check_shapes(weights: FloatVector, delta: FloatVector) -> None:
    if weights.shape != delta.shape or weights.ndim != 1:
        raise ValueError(
            f"weights {weights.shape} and delta {delta.shape} must be equal flat vectors"
        )


def _moment(moment: FloatVector | None, weights: FloatVector) -> FloatVector:
    # Moments start at zero, sized by the first step (the model size is not known before).
    if moment is None:
        return np.zeros_like(weights, dtype=np.float32)
    if moment.shape != weights.shape:
        raise ValueError(
            f"server optimizer state has shape {moment.shape}, model has {weights.shape}"
        )
    return moment


def _saved(moment: FloatVector | None) -> np.ndarray:
    return np.zeros(0, dtype=np.float32) if moment is None else moment.copy()


def _restored(state: StateDict, key: str) -> FloatVector | None:
    value = state[key]
    if not isinstance(value, np.ndarray):
        raise ValueError(f"server optimizer state {key!r} must be an array")
    return None if value.size == 0 else value.astype(np.float32, copy=True)
