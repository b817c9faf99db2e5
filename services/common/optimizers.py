"""SGD and Adam for local training, written out instead of taken from `torch.optim`.

The first `torch.optim` optimizer a process builds or steps imports `torch._dynamo`
(and sympy with it): several CPU seconds, paid by every trainer on its first round, by
all of them at once when a federation starts (docs/decisions/0017). These classes do
exactly what `torch.optim.SGD` and `torch.optim.Adam` do on the CPU (their
single-tensor code path, op for op), so the weights they produce are bit for bit the
same; a unit test holds them to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch

StepHook = Callable[["LocalOptimizer"], None]

_step_hooks: dict[int, StepHook] = {}
_next_hook_id = 0


class HookHandle:
    """Removes a step hook registered with `register_step_hook`."""

    def __init__(self, hook_id: int) -> None:
        self._id = hook_id

    def remove(self) -> None:
        """Stop calling the hook (idempotent)."""
        _step_hooks.pop(self._id, None)


def register_step_hook(hook: StepHook) -> HookHandle:
    """Call `hook(optimizer)` after every step of every local optimizer in this process."""
    global _next_hook_id
    _next_hook_id += 1
    _step_hooks[_next_hook_id] = hook
    return HookHandle(_next_hook_id)


class LocalOptimizer(Protocol):
    """What local training needs of an optimizer."""

    def zero_grad(self) -> None:
        """Drop the gradients of the previous step."""

    def step(self) -> None:
        """Apply one update from the current gradients."""


class _Optimizer:
    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        self.lr = lr
        self.weight_decay = weight_decay

    def zero_grad(self) -> None:
        """Drop the gradients (set to None, as `zero_grad(set_to_none=True)` does)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Apply one update from the current gradients, then run the step hooks."""
        with torch.no_grad():
            for index, param in enumerate(self.params):
                if param.grad is not None:
                    self._update(index, param, param.grad)
        for hook in list(_step_hooks.values()):
            hook(self)

    def _update(self, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError

    def _decayed(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        # L2 penalty folded into the gradient (not decoupled), as torch.optim does.
        return grad.add(param, alpha=self.weight_decay) if self.weight_decay != 0 else grad


class SGD(_Optimizer):
    """`torch.optim.SGD` with momentum and weight decay (no dampening, no Nesterov)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def _update(self, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        grad = self._decayed(param, grad)
        if self.momentum != 0:
            buffer = self._buffers[index]
            if buffer is None:
                buffer = grad.detach().clone()
                self._buffers[index] = buffer
            else:
                buffer.mul_(self.momentum).add_(grad)
            grad = buffer
        param.add_(grad, alpha=-self.lr)


class Adam(_Optimizer):
    """`torch.optim.Adam` (betas 0.9/0.999, eps 1e-8, L2 weight decay, no AMSGrad)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self._steps = [0] * len(self.params)
        self._exp_avg = [_zeros_like(p) for p in self.params]
        self._exp_avg_sq = [_zeros_like(p) for p in self.params]

    def _update(self, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        self._steps[index] += 1
        step = float(self._steps[index])
        grad = self._decayed(param, grad)
        exp_avg, exp_avg_sq = self._exp_avg[index], self._exp_avg_sq[index]
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1**step
        bias_correction2 = 1 - self.beta2**step
        step_size = self.lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def _zeros_like(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)
