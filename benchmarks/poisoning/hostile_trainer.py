"""A HOSTILE trainer for benchmarks and adversarial tests, never for a site.

It is the real trainer process (`TrainerService`: join, local training, publishing with
confirms, heartbeats) whose outgoing updates are tampered with the way a malicious site
would: the delta scaled (-1 flips its sign), `num_examples` inflated at the join and in
every update, or each update sent many times under fresh ids. It is reachable only as
`python -m benchmarks.poisoning.hostile_trainer`, not through the `fedmq` command, and
takes its site settings from the same `FEDMQ_*` variables as `fedmq trainer`.

    python -m benchmarks.poisoning.hostile_trainer --scale -4 --claim-examples 1000000000000000000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schemas import JoinAccepted, ModelUpdate, Tensor, new_id
from services.common.bus import Bus
from services.common.training import TrainResult
from services.trainer.local_model import LocalModel
from services.trainer.service import TrainerService
from services.trainer.settings import TrainerSettings


@dataclass(frozen=True)
class Attack:
    """What the hostile site does to each honest update before sending it."""

    scale: float | None = None
    """Multiply every delta tensor by this (None: leave the delta alone)."""
    claim_examples: int | None = None
    """Claim this many training examples, at the join and in every update."""
    copies: int = 1
    """Send each update this many times, each copy with a fresh `update_id`."""

    def tamper(self, update: ModelUpdate) -> ModelUpdate:
        """The update as the hostile site sends it (fresh signature-free copy)."""
        changes: dict[str, object] = {}
        if self.scale is not None:
            factor = np.float32(self.scale)
            changes["delta"] = tuple(
                Tensor.from_numpy(t.name, np.asarray(t.to_numpy(), np.float32) * factor)
                for t in update.delta
            )
        if self.claim_examples is not None:
            changes["num_examples"] = self.claim_examples
        return update.model_copy(update=changes) if changes else update


class HostileTrainer(TrainerService):
    """`TrainerService` whose updates pass through an `Attack` on their way out."""

    def __init__(self, settings: TrainerSettings, *, bus: Bus, attack: Attack) -> None:
        super().__init__(settings, bus=bus)
        self._attack = attack

    def _join(self, *, num_examples: int) -> JoinAccepted:
        claimed = self._attack.claim_examples
        return super()._join(num_examples=num_examples if claimed is None else claimed)

    def _make_update(self, local: LocalModel, result: TrainResult) -> ModelUpdate | None:
        update = super()._make_update(local, result)
        return None if update is None else self._attack.tamper(update)

    def _send(self, update: ModelUpdate) -> None:
        super()._send(update)
        for _ in range(self._attack.copies - 1):
            super()._send(update.model_copy(update={"update_id": new_id()}))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one hostile trainer until SIGTERM (settings from `FEDMQ_*`, attack from flags)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, help="multiply each delta by this (-1: flip)")
    parser.add_argument("--claim-examples", type=int, help="claimed num_examples")
    parser.add_argument("--copies", type=int, default=1, help="send each update this often")
    args = parser.parse_args(argv)
    attack = Attack(scale=args.scale, claim_examples=args.claim_examples, copies=args.copies)

    from services.common.connect import bus_from_settings
    from services.common.logging import configure_logging
    from services.common.signals import on_termination
    from services.trainer.local_round import set_torch_threads

    settings = TrainerSettings()  # type: ignore[call-arg]  # trainer_id from FEDMQ_TRAINER_ID
    configure_logging(level=settings.log_level, json=settings.log_json)
    set_torch_threads(settings.torch_threads)
    bus = bus_from_settings(settings)
    service = HostileTrainer(settings, bus=bus, attack=attack)
    on_termination(service.stop)
    try:
        return service.run()
    finally:
        bus.close()


if __name__ == "__main__":
    sys.exit(main())
