"""A durable, monotonic count of DP releases, kept apart from the rotating checkpoints.

Epsilon composes over every noisy version ever published. A checkpoint holds the count at
its own version, so restoring an older one (a fallback, an operator's copy) would make
epsilon go back and the budget look unspent. The ledger is written before each version is
published and only ever grows; a restored aggregator counts from the larger of the two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Final

LEDGER_NAME: Final = "privacy-ledger.json"


class PrivacyLedger:
    """`steps` released so far, as durable as a checkpoint (temp file, fsync, rename)."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / LEDGER_NAME
        self._steps = self._read()

    @property
    def steps(self) -> int:
        """The most releases ever recorded here."""
        return self._steps

    def record(self, steps: int, *, epsilon: float | None = None) -> None:
        """Make `steps` durable before the release it counts is published (never lowers)."""
        if steps <= self._steps:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temp = self._path.with_suffix(".tmp")
        with temp.open("w") as handle:
            json.dump({"steps": steps, "epsilon": epsilon}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self._path)
        self._steps = steps

    def _read(self) -> int:
        try:
            value = json.loads(self._path.read_text()).get("steps", 0)
        except FileNotFoundError:
            return 0
        except (ValueError, AttributeError) as error:
            # An unreadable ledger must not silently reset epsilon to zero.
            raise ValueError(f"unreadable privacy ledger {self._path}: {error}") from error
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"privacy ledger {self._path} holds a bad step count {value!r}")
        return value
