"""fedmq's local SGD and Adam: torch.optim's arithmetic, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from services.common.optimizers import SGD, Adam, register_step_hook
from services.common.training import TrainConfig, build_optimizer


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def _train(model: nn.Module, optimizer: torch.optim.Optimizer | SGD | Adam) -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(6):
        images = torch.randn(5, 1, 8, 8, generator=generator)
        labels = torch.randint(0, 3, (5,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        ),
        (lambda p: SGD(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
        (
            lambda p: Adam(p, lr=0.01, weight_decay=1e-3),
            lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
        ),
    ],
    ids=["sgd-momentum-decay", "sgd-plain", "adam-decay"],
)
def test_given_the_same_batches_when_both_optimizers_train_then_the_weights_are_bit_identical(
    ours, theirs
):
    mine, reference = _model(0), _model(0)
    _train(mine, ours(mine.parameters()))
    _train(reference, theirs(reference.parameters()))
    for (name, a), (_, b) in zip(
        mine.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_given_a_step_hook_when_the_optimizer_steps_then_the_hook_counts_each_step():
    model = _model(1)
    steps: list[object] = []
    handle = register_step_hook(steps.append)
    optimizer = build_optimizer(model, TrainConfig(lr=0.1))
    _train(model, optimizer)
    handle.remove()
    _train(model, optimizer)
    assert steps == [optimizer] * 6


def test_given_a_fresh_process_when_a_local_round_trains_then_torch_dynamo_is_never_imported():
    # torch.optim would import it (seconds of CPU) on the first optimizer of the process.
    script = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from services.common.training import TrainConfig, train_local\n"
        "data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))\n"
        "for optimizer in ('sgd', 'adam'):\n"
        "    train_local(nn.Linear(4, 2), data, TrainConfig(batch_size=4, optimizer=optimizer))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "False"
