"""Central DP accounting: epsilon per version, the epsilon budget, and the noise end to end."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from schemas import ModelPublished, ModelUpdate, TaskSpec, Tensor
from services.aggregator.accounting import (
    DEFAULT_DELTA,
    PrivacyAccountant,
    gaussian_epsilon,
    privacy_accountant,
)
from services.aggregator.checkpoint import CheckpointStore
from services.aggregator.core import AggregatorCore
from services.aggregator.guard import GuardSettings
from services.aggregator.layout import ParamLayout
from services.aggregator.service import AggregatorService
from services.aggregator.settings import AggregatorSettings
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.strategies.privacy import GaussianAggregateNoise
from services.aggregator.task import TaskDefinition
from services.aggregator.validation import RejectedUpdate
from services.common.bus import Bus, Delivery
from services.common.bus.memory import InMemoryBus
from services.common.messaging import decode_delivery, publish_message
from services.common.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    REASON_HEADER,
    UPDATES_EXCHANGE,
    BindingSpec,
    QueueSpec,
    Topology,
    shared_topology,
    task_topology,
    update_key,
)

SIZE = 500
LAYOUT = ParamLayout.from_entries([("w", "float32", (SIZE,))])


def _rdp_epsilon(z: float, steps: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), steps)
    return float(accountant.get_epsilon(delta))


def _classic_rdp_bound(z: float, steps: int, delta: float) -> float:
    # Mironov 2017: Gaussian RDP is alpha / (2 z^2); eps = min over alpha of T·rdp + log(1/δ)/(α-1)
    orders = np.linspace(1.01, 512.0, 200_000)
    return float(np.min(steps * orders / (2 * z * z) + math.log(1 / delta) / (orders - 1)))


# -- epsilon ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "steps", "delta"), [(1.0, 100, 1e-5), (0.8, 1, 1e-6), (4.0, 1000, 1e-5), (2.0, 37, 1e-3)]
)
def test_epsilon_equals_the_rdp_accountant_composed_step_by_step(
    z: float, steps: int, delta: float
) -> None:
    assert gaussian_epsilon(z, steps, delta) == pytest.approx(_rdp_epsilon(z, steps, delta))


@pytest.mark.parametrize(("z", "steps"), [(1.0, 100), (0.7, 10), (5.0, 1000)])
def test_epsilon_lies_between_the_tight_gaussian_value_and_the_classic_rdp_bound(
    z: float, steps: int
) -> None:
    # T Gaussian releases of multiplier z are one Gaussian of multiplier z/sqrt(T): its exact
    # epsilon is a lower bound no accountant can beat; the textbook RDP conversion is above.
    epsilon = gaussian_epsilon(z, steps, DEFAULT_DELTA)
    tight = dp_accounting.get_epsilon_gaussian(z / math.sqrt(steps), DEFAULT_DELTA)
    assert tight <= epsilon <= _classic_rdp_bound(z, steps, DEFAULT_DELTA)


def test_epsilon_for_z_1_after_100_versions_at_delta_1e5_is_about_96() -> None:
    assert gaussian_epsilon(1.0, 100, 1e-5) == pytest.approx(96.116, abs=0.01)


def test_epsilon_grows_with_versions_and_shrinks_with_noise() -> None:
    assert gaussian_epsilon(1.0, 10, 1e-5) < gaussian_epsilon(1.0, 11, 1e-5)
    assert gaussian_epsilon(2.0, 10, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    assert gaussian_epsilon(1.0, 10, 1e-3) < gaussian_epsilon(1.0, 10, 1e-5)


def test_no_version_spends_nothing_and_no_noise_spends_everything() -> None:
    assert gaussian_epsilon(1.0, 0, 1e-5) == 0.0
    assert gaussian_epsilon(0.0, 1, 1e-5) == math.inf


@pytest.mark.parametrize(("steps", "delta"), [(-1, 1e-5), (1, 0.0), (1, 1.0)])
def test_impossible_steps_or_delta_are_refused(steps: int, delta: float) -> None:
    with pytest.raises(ValueError):
        gaussian_epsilon(1.0, steps, delta)


# -- the accountant ----------------------------------------------------------------------------


def _noise(z: float = 1.0) -> GaussianAggregateNoise:
    return GaussianAggregateNoise(clip_norm=1.0, noise_multiplier=z)


def test_the_accountant_reports_epsilon_of_the_releases_so_far() -> None:
    noise = _noise()
    accountant = PrivacyAccountant(noise, delta=1e-6)
    assert accountant.epsilon == 0.0
    for _ in range(3):
        noise.aggregate([np.zeros(2, np.float32)], denominator=1)
    assert accountant.steps == 3
    assert accountant.epsilon == pytest.approx(_rdp_epsilon(1.0, 3, 1e-6))


def test_the_budget_is_exhausted_when_the_next_release_would_exceed_it() -> None:
    noise = _noise()
    budget = (gaussian_epsilon(1.0, 2, DEFAULT_DELTA) + gaussian_epsilon(1.0, 3, DEFAULT_DELTA)) / 2
    accountant = PrivacyAccountant(noise, budget=budget)
    noise.aggregate([np.zeros(2, np.float32)], denominator=1)
    assert not accountant.exhausted  # a 2nd release stays within the budget
    noise.aggregate([np.zeros(2, np.float32)], denominator=1)
    assert accountant.exhausted  # a 3rd would not


def test_without_a_budget_the_accountant_is_never_exhausted() -> None:
    noise = _noise(z=0.0)
    noise.aggregate([np.zeros(2, np.float32)], denominator=1)
    assert not PrivacyAccountant(noise).exhausted


@pytest.mark.parametrize(("delta", "budget"), [(0.0, None), (1.5, None), (1e-5, 0.0)])
def test_the_accountant_refuses_an_impossible_delta_or_budget(
    delta: float, budget: float | None
) -> None:
    with pytest.raises(ValueError):
        PrivacyAccountant(_noise(), delta=delta, budget=budget)


def test_only_strategies_that_add_noise_get_an_accountant() -> None:
    dp = build_strategy(_dp_config(buffer_size=2))
    plain = build_strategy(StrategyConfig(name="fedbuff"))
    fedasync = build_strategy(StrategyConfig(name="fedasync"))
    accountant = privacy_accountant(dp, delta=1e-6, budget=3.0)
    assert accountant is not None and accountant.delta == 1e-6 and accountant.budget == 3.0
    assert privacy_accountant(plain) is None
    assert privacy_accountant(fedasync) is None


# -- through the aggregator's core ---------------------------------------------------------------

Z, CLIP, K = 1.5, 2.0, 4


def _dp_config(*, buffer_size: int = K) -> StrategyConfig:
    return StrategyConfig(
        name="fedbuff", buffer_size=buffer_size, dp_noise_multiplier=Z, dp_clip_norm=CLIP, seed=7
    )


def _dp_task(*, buffer_size: int = K) -> TaskDefinition:
    return TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=_dp_config(buffer_size=buffer_size),
    )


def _dp_core(
    *, budget: float | None = None, delta: float = DEFAULT_DELTA, buffer_size: int = K
) -> AggregatorCore:
    task = _dp_task(buffer_size=buffer_size)
    strategy = build_strategy(task.strategy)
    return AggregatorCore(
        task=task,
        layout=LAYOUT,
        weights=np.zeros(SIZE, np.float32),
        integers={},
        strategy=strategy,
        accountant=privacy_accountant(strategy, delta=delta, budget=budget),
    )


def _zero_update(trainer: str, base: int, fill: float = 0.0) -> ModelUpdate:
    delta = (Tensor.from_numpy("w", np.full(SIZE, fill, np.float32)),)
    return ModelUpdate(
        task_id="t", trainer_id=trainer, base_version=base, num_examples=10, delta=delta
    )


def _reason(core: AggregatorCore, update: ModelUpdate) -> str:
    with pytest.raises(RejectedUpdate) as caught:
        core.submit(update, redelivered=False, now=0.0)
    return caught.value.reason


def test_zero_updates_through_dp_fedbuff_move_the_weights_by_noise_of_std_z_c_over_k() -> None:
    # Given DP FedBuff with K = 4, C = 2, z = 1.5: noise std z·C/K = 0.75 per coordinate
    core = _dp_core()
    steps = 120
    changes = []
    # When K distinct trainers send all-zero deltas, version after version
    for _ in range(steps):
        before = core.weights.copy()
        for site in range(K):
            core.submit(_zero_update(f"site-{site}", core.version), redelivered=False, now=0.0)
        changes.append(core.weights - before)
    # Then each version's change is pure noise of std z·C/K, and epsilon counts every version
    noise = np.concatenate(changes)
    assert core.version == steps
    assert float(noise.std()) == pytest.approx(Z * CLIP / K, rel=0.05)
    assert abs(float(noise.mean())) < 0.01
    assert core.epsilon == pytest.approx(_rdp_epsilon(Z, steps, DEFAULT_DELTA))


def test_the_core_stops_applying_before_a_version_would_exceed_the_budget() -> None:
    # Given a budget between epsilon(2 versions) and epsilon(3 versions), K = 1
    budget = (gaussian_epsilon(Z, 2, DEFAULT_DELTA) + gaussian_epsilon(Z, 3, DEFAULT_DELTA)) / 2
    core = _dp_core(budget=budget, buffer_size=1)
    core.submit(_zero_update("site-0", 0), redelivered=False, now=0.0)
    assert not core.privacy_exhausted
    core.submit(_zero_update("site-0", 1), redelivered=False, now=0.0)
    # When a third update arrives
    reason = _reason(core, _zero_update("site-1", 2))
    # Then it is refused, the model stays at version 2, within the budget
    assert reason == "privacy-budget-exhausted"
    assert core.privacy_exhausted
    assert core.version == 2
    assert core.updates_rejected == 1
    assert core.epsilon is not None and core.epsilon <= budget
    assert core.epsilon == pytest.approx(gaussian_epsilon(Z, 2, DEFAULT_DELTA))


def test_a_budget_below_one_version_applies_nothing() -> None:
    core = _dp_core(budget=gaussian_epsilon(Z, 1, DEFAULT_DELTA) / 2, buffer_size=1)
    assert _reason(core, _zero_update("site-0", 0)) == "privacy-budget-exhausted"
    assert core.version == 0


def test_a_trainers_second_update_in_one_aggregate_is_refused_under_dp() -> None:
    core = _dp_core(buffer_size=2)
    core.submit(_zero_update("site-0", 0), redelivered=False, now=0.0)
    assert _reason(core, _zero_update("site-0", 0)) == "already-in-buffer"
    outcome = core.submit(_zero_update("site-1", 0), redelivered=False, now=0.0)
    assert outcome.status == "stepped"
    # once the aggregate is released, site-0 may contribute to the next one
    assert core.submit(_zero_update("site-0", 1), redelivered=False, now=0.0).status == "buffered"


def test_without_dp_and_with_the_one_vote_limit_off_a_trainer_may_fill_the_buffer() -> None:
    task = TaskDefinition(
        spec=TaskSpec(task_id="t", model="cnn-small", num_classes=2),
        strategy=StrategyConfig(name="fedbuff", buffer_size=2),
        guard=GuardSettings(one_update_per_trainer=False),
    )
    core = AggregatorCore(
        task=task,
        layout=LAYOUT,
        weights=np.zeros(SIZE, np.float32),
        integers={},
        strategy=build_strategy(task.strategy),
    )
    core.submit(_zero_update("site-0", 0), redelivered=False, now=0.0)
    assert core.submit(_zero_update("site-0", 0), redelivered=False, now=0.0).status == "stepped"
    assert core.epsilon is None


def test_the_privacy_spent_survives_a_restart_from_a_checkpoint(tmp_path: Path) -> None:
    # Given 3 noisy versions, checkpointed
    core = _dp_core(buffer_size=1)
    for version in range(3):
        core.submit(_zero_update("site-0", version), redelivered=False, now=0.0)
    store = CheckpointStore(tmp_path)
    store.save(core.checkpoint())
    # When a new aggregator restores it
    task = _dp_task(buffer_size=1)
    strategy = build_strategy(task.strategy)
    saved = store.latest()
    assert saved is not None
    restored = AggregatorCore.restore(
        task=task,
        layout=LAYOUT,
        strategy=strategy,
        saved=saved,
        accountant=privacy_accountant(strategy),
    )
    # Then its epsilon counts the 3 versions released before the restart
    assert restored.epsilon == pytest.approx(gaussian_epsilon(Z, 3, DEFAULT_DELTA))


# -- through the service (in-memory bus) -----------------------------------------------------


@pytest.fixture
def memory_bus() -> Iterator[InMemoryBus]:
    bus = InMemoryBus()
    yield bus
    bus.close()


def _declare_with_taps(bus: Bus, task: TaskDefinition) -> tuple[str, str]:
    """The task's topology (as the service declares it) plus a tap on events and dead letters."""
    published = QueueSpec(
        name="test.published",
        durable=False,
        bindings=(BindingSpec(EVENTS_EXCHANGE, "model.published.t"),),
    )
    dead = QueueSpec(
        name="test.dead", durable=False, bindings=(BindingSpec(DEAD_LETTER_EXCHANGE, ""),)
    )
    topology = shared_topology().merge(
        task_topology("t", max_update_bytes=task.max_update_bytes, queue_type=task.queue_type)
    )
    bus.declare(topology.merge(Topology(queues=(published, dead))))
    return published.name, dead.name


def _drain(bus: Bus, queue: str, *, until: int, timeout: float = 10.0) -> list[Delivery]:
    seen: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(seen) < until and time.monotonic() < deadline:
        delivery = bus.get(queue)
        if delivery is None:
            time.sleep(0.02)
            continue
        bus.ack(delivery)
        seen.append(delivery)
    return seen


def test_the_service_publishes_epsilon_per_version_and_dead_letters_past_the_budget(
    memory_bus: InMemoryBus, tmp_path: Path
) -> None:
    # Given an aggregator with DP (K = 1) whose budget allows exactly 2 versions
    budget = (gaussian_epsilon(Z, 2, DEFAULT_DELTA) + gaussian_epsilon(Z, 3, DEFAULT_DELTA)) / 2
    task = _dp_task(buffer_size=1)
    core = _dp_core(budget=budget, buffer_size=1)
    published, dead = _declare_with_taps(memory_bus, task)
    service = AggregatorService(
        bus=memory_bus,
        task=task,
        core=core,
        store=CheckpointStore(tmp_path),
        settings=AggregatorSettings(checkpoint_dir=tmp_path),
    )
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        # When three trainers send one update each, in order, each based on the newest version
        for version, site in enumerate(("site-0", "site-1", "site-2")):
            update = _zero_update(site, min(version, 2))
            publish_message(memory_bus, UPDATES_EXCHANGE, update_key("t", site), update)
        letters = _drain(memory_bus, dead, until=1)
        events = _drain(memory_bus, published, until=3)
    finally:
        service.stop()
        thread.join(timeout=10)
    # Then versions 0, 1, 2 were announced with their epsilon, and the third update was refused
    announced = [decode_delivery(event, (ModelPublished,)) for event in events]
    assert [(event.version, event.epsilon) for event in announced] == [
        (0, 0.0),
        (1, pytest.approx(gaussian_epsilon(Z, 1, DEFAULT_DELTA))),
        (2, pytest.approx(gaussian_epsilon(Z, 2, DEFAULT_DELTA))),
    ]
    assert [letter.properties.headers[REASON_HEADER] for letter in letters] == [
        "privacy-budget-exhausted"
    ]
    assert core.version == 2
