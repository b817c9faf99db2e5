"""Launch a whole federation on one machine as real processes: aggregator, evaluator, trainers.

Used by `fedmq demo` and by the study benchmarks; every process is a `fedmq` sub-command
configured through `FEDMQ_*` variables, exactly as a deployment would configure it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 30.0
"""How long a process may take to leave cleanly after SIGTERM before it is killed."""


@dataclass(frozen=True)
class FederationPlan:
    """Everything that defines one simulated federation run."""

    task_id: str
    run_dir: Path
    trainers: int = 4
    model: str = "cnn-small"
    strategy: str = "fedbuff"
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    stragglers: int = 0
    straggler_slowdown: float = 5.0
    slow_sites: tuple[int, ...] | None = None
    """Which sites are slow; None: the last `stragglers` ones."""
    data_dir: Path | None = None
    seed: int = 0
    aggregator_flags: tuple[str, ...] = ()
    """Extra `fedmq aggregator` flags (strategy parameters, hyperparameters)."""
    amqp_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def trainer_id(self, index: int) -> str:
        """Identity of simulated site `index`."""
        return f"site-{index}"

    def slowdown(self, index: int) -> float:
        """Simulated slowdown of site `index` (`slow_sites`, else the last `stragglers`)."""
        if self.slow_sites is not None:
            slow = index in self.slow_sites
        else:
            slow = index >= self.trainers - self.stragglers
        return self.straggler_slowdown if slow else 1.0


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]


class Federation:
    """The processes of one run; `stop()` takes them down in a safe order."""

    def __init__(self, plan: FederationPlan) -> None:
        self.plan = plan
        self._children: list[_Child] = []
        (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def eval_log(self) -> Path:
        """The evaluator's JSONL log."""
        return self.plan.run_dir / "eval.jsonl"

    def start(self, *, trainers: int | None = None) -> None:
        """Start the aggregator, the evaluator, then the first `trainers` sites (default all)."""
        plan = self.plan
        self._spawn(
            "aggregator",
            [
                "aggregator",
                "--task-id",
                plan.task_id,
                "--model",
                plan.model,
                "--strategy",
                plan.strategy,
                "--seed",
                str(plan.seed),
                "--checkpoint-dir",
                str(plan.run_dir / "checkpoints"),
                *plan.aggregator_flags,
            ],
        )
        self._spawn(
            "evaluator",
            ["evaluator"],
            {
                "FEDMQ_LOG_PATH": str(self.eval_log),
                "FEDMQ_CHECKPOINT_DIR": str(plan.run_dir / "checkpoints"),
            },
        )
        for index in range(plan.trainers if trainers is None else trainers):
            self.add_trainer(index)

    def add_trainer(self, index: int) -> None:
        """Start simulated site `index` (any time, also while the federation runs)."""
        self._spawn(self.plan.trainer_id(index), ["trainer"], self.trainer_env(index))

    def trainer_env(self, index: int) -> dict[str, str]:
        """The `FEDMQ_*` variables that make a trainer simulated site `index`."""
        plan = self.plan
        return {
            "FEDMQ_TRAINER_ID": plan.trainer_id(index),
            "FEDMQ_SITE_INDEX": str(index),
            "FEDMQ_NUM_SITES": str(plan.trainers),
            "FEDMQ_PARTITION": plan.partition,
            "FEDMQ_DIRICHLET_ALPHA": str(plan.dirichlet_alpha),
            "FEDMQ_PARTITION_SEED": str(plan.seed),
            "FEDMQ_SEED": str(plan.seed + index),
            "FEDMQ_SIMULATED_SLOWDOWN": str(plan.slowdown(index)),
        }

    def stop_trainer(self, index: int) -> int:
        """SIGTERM one site and wait for it to leave; return its exit code."""
        (child,) = self._named(self.plan.trainer_id(index))
        child.process.send_signal(signal.SIGTERM)
        code = _wait(child)
        self._children.remove(child)
        return code

    def alive(self) -> dict[str, bool]:
        """Which processes still run, by name."""
        return {child.name: child.process.poll() is None for child in self._children}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each running process has used so far, from /proc."""
        ticks = os.sysconf("SC_CLK_TCK")
        result: dict[str, float] = {}
        for child in self._children:
            try:
                stat = Path(f"/proc/{child.process.pid}/stat").read_text()
            except OSError:
                continue  # exited, or not Linux
            fields = stat.rpartition(")")[2].split()
            result[child.name] = (int(fields[11]) + int(fields[12])) / ticks
        return result

    def first_death(self) -> tuple[str, int, str] | None:
        """A process that exited on its own: (name, exit code, last line of its log)."""
        for child in self._children:
            code = child.process.poll()
            if code is not None:
                return child.name, code, self.last_log_line(child.name)
        return None

    def last_log_line(self, name: str) -> str:
        """The last non-empty line process `name` wrote (its error line when it failed)."""
        path = self.plan.run_dir / "logs" / f"{name}.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def stop(self) -> dict[str, int]:
        """SIGTERM trainers first (they say goodbye), then the evaluator, then the aggregator."""
        codes: dict[str, int] = {}
        for group in (self._trainers(), self._named("evaluator"), self._named("aggregator")):
            for child in group:
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                codes[child.name] = _wait(child)
        return codes

    def _trainers(self) -> list[_Child]:
        return [c for c in self._children if c.name.startswith("site-")]

    def _named(self, name: str) -> list[_Child]:
        return [c for c in self._children if c.name == name]

    def _spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        module: str = "services.cli",
    ) -> None:
        """Start `python -m module *args` as child `name` (benchmarks start other modules)."""
        plan = self.plan
        environment = dict(os.environ)
        environment.update(plan.extra_env)
        environment.update(
            {"FEDMQ_TASK_ID": plan.task_id, "FEDMQ_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}
        )
        if plan.data_dir is not None:
            environment["FEDMQ_DATA_DIR"] = str(plan.data_dir)
        if plan.amqp_url is not None:
            environment["FEDMQ_AMQP_URL"] = plan.amqp_url
        environment.update(env or {})
        log_file = (plan.run_dir / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops children in order
        )
        self._children.append(_Child(name, process, log_file))
        log.info("process_started", name=name, pid=process.pid)


def _wait(child: _Child) -> int:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while child.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if child.process.poll() is None:
        log.warning("process_killed", name=child.name)
        child.process.kill()
    code = child.process.wait()
    child.log.close()
    return code
