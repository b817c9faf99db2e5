"""How much a stale update counts: staleness functions s(t) with s(0) = 1 (Xie et al. 2019).

Staleness `t` is `version_now - base_version`, the number of global steps the trainer missed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

StalenessName = Literal["constant", "polynomial", "hinge"]


class StalenessFunction(Protocol):
    """A weight in (0, 1] for an update of the given staleness, non-increasing in it."""

    @property
    def name(self) -> str:
        """Name used in configuration and metrics."""
        ...

    def __call__(self, staleness: int) -> float:
        """Weight of an update that is `staleness` versions behind."""
        ...


def _check_staleness(staleness: int) -> None:
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")


@dataclass(frozen=True, slots=True)
class ConstantStaleness:
    """s(t) = 1: every update counts fully however old it is."""

    name: ClassVar[str] = "constant"

    def __call__(self, staleness: int) -> float:
        """Weight of an update that is `staleness` versions behind."""
        _check_staleness(staleness)
        return 1.0


@dataclass(frozen=True, slots=True)
class PolynomialStaleness:
    """s(t) = (1 + t)^-a."""

    name: ClassVar[str] = "polynomial"
    a: float

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError(f"polynomial staleness exponent a must be >= 0, got {self.a}")

    def __call__(self, staleness: int) -> float:
        """Weight of an update that is `staleness` versions behind."""
        _check_staleness(staleness)
        return float((1.0 + staleness) ** -self.a)


@dataclass(frozen=True, slots=True)
class HingeStaleness:
    """s(t) = 1 if t <= b, else 1 / (a (t - b) + 1)."""

    name: ClassVar[str] = "hinge"
    a: float
    b: int

    def __post_init__(self) -> None:
        if self.a < 0 or self.b < 0:
            raise ValueError(f"hinge staleness needs a >= 0 and b >= 0, got a={self.a} b={self.b}")

    def __call__(self, staleness: int) -> float:
        """Weight of an update that is `staleness` versions behind."""
        _check_staleness(staleness)
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)


def staleness_function(name: StalenessName, **params: float) -> StalenessFunction:
    """Build the staleness function called `name` from its parameters (`a`, `b`)."""
    if name == "constant":
        _no_extra(name, params, allowed=())
        return ConstantStaleness()
    if name == "polynomial":
        _no_extra(name, params, allowed=("a",))
        return PolynomialStaleness(a=params.get("a", 0.5))
    if name == "hinge":
        _no_extra(name, params, allowed=("a", "b"))
        b = params.get("b", 4)
        if b != int(b):
            raise ValueError(f"hinge staleness b is a number of versions, got {b}")
        return HingeStaleness(a=params.get("a", 10.0), b=int(b))
    raise ValueError(f"unknown staleness function {name!r} (constant, polynomial, hinge)")


def _no_extra(name: str, params: dict[str, float], *, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise ValueError(f"{name} staleness takes no parameter(s) {', '.join(extra)}")
