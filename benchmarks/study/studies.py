"""The five studies: which runs each one is made of, with the strategy settings stated once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.study.data import Partition
from benchmarks.study.spec import RunSpec
from services.aggregator.strategies.factory import StrategyConfig

NEVER_S = 1e9
"""FedAvg's round timeout in virtual seconds: the barrier waits for every selected site."""

DEFAULT_NOISE = (0.0, 0.01, 0.1, 0.3, 1.0)
DEFAULT_DP_CLIP = 10.0
"""Honest cnn-small updates here: about 15 in the first rounds, median about 6 over a run;
C = 10 clips the large early ones. Noise on the mean is z * C / K per coordinate."""
ROBUST_BUFFER = 8
"""Buffer of the Byzantine and DP runs: room for the 2 bad updates a robust rule must outvote,
and the largest DP denominator 8 sites allow (noise on the mean is z*C/K)."""
TRIM_FRACTION = 0.25
"""floor(0.25 * 8) = 2 values trimmed per side: as many as there are attackers."""


@dataclass(frozen=True)
class StudyOptions:
    """Knobs of the studies that are not shared run settings."""

    seed: int = 0
    noise: Sequence[float] = DEFAULT_NOISE
    dp_clip: float = DEFAULT_DP_CLIP
    sites: int = 8
    uniform_weights: bool = False
    """FedBuff in the straggler and partition studies weighs every update alike (each site
    trains the same number of steps), the setting the remedies study adopted."""


def fedbuff(seed: int, **overrides: object) -> StrategyConfig:
    """FedBuff K=4, server lr 1, polynomial staleness (1+t)^-0.5, sample-weighted mean."""
    base = {
        "name": "fedbuff", "buffer_size": 4, "staleness": "polynomial", "staleness_a": 0.5,
        "aggregator": "mean", "sample_weighted": True,
    }  # fmt: skip
    return StrategyConfig.model_validate({**base, "seed": seed, **overrides})


def fedasync(seed: int) -> StrategyConfig:
    """FedAsync alpha 0.6 with polynomial staleness (1+t)^-0.5 (Xie et al.'s setting)."""
    return StrategyConfig(
        name="fedasync", alpha=0.6, staleness="polynomial", staleness_a=0.5,
        sample_weighted=True, seed=seed,
    )  # fmt: skip


def fedavg(seed: int, sites: int) -> StrategyConfig:
    """Round barrier over all sites: a round closes when every site's update arrived."""
    return StrategyConfig(
        name="fedavg", clients_per_round=sites, min_updates=sites, round_timeout=NEVER_S,
        aggregator="mean", sample_weighted=True, seed=seed,
    )  # fmt: skip


def strategies(options: StudyOptions) -> list[RunSpec]:
    s = options.seed
    return [
        RunSpec("centralized", None),
        RunSpec(f"centralized, {options.sites}x budget", None, budget_factor=options.sites),
        RunSpec("FedBuff K=4", fedbuff(s)),
        RunSpec("FedAsync a=0.6", fedasync(s)),
        RunSpec("FedAvg barrier", fedavg(s, options.sites)),
    ]


def remedies(options: StudyOptions) -> list[RunSpec]:
    """Standard remedies for accuracy swings under label skew, through existing settings."""
    s = options.seed
    momentum = fedbuff(s, server_optimizer="momentum", server_momentum=0.9, server_lr=0.1)
    return [
        RunSpec("FedBuff K=4, server momentum 0.9 lr 0.1", momentum),
        RunSpec(f"FedBuff K={ROBUST_BUFFER}", fedbuff(s, buffer_size=ROBUST_BUFFER)),
        # Every site trains the same number of steps, so a size-weighted mean over-weights
        # the two largest sites (92% and 99% pneumonia) in whichever buffer they land.
        RunSpec("FedBuff K=4, uniform weights", fedbuff(s, sample_weighted=False)),
        RunSpec(
            f"FedBuff K={ROBUST_BUFFER}, uniform weights",
            fedbuff(s, buffer_size=ROBUST_BUFFER, sample_weighted=False),
        ),
        # Half a step per version: the last buffer's sites move the decision threshold half
        # as far, where momentum (above) carried their pull into the versions after.
        RunSpec(
            "FedBuff K=4, uniform weights, server lr 0.5",
            fedbuff(s, sample_weighted=False, server_lr=0.5),
        ),
    ]


def stable(options: StudyOptions) -> list[RunSpec]:
    """Candidate stable recipes under label skew and 2 stragglers, uniform weights throughout."""
    s = options.seed
    uniform = {"sample_weighted": False}
    return [
        RunSpec("K=4, server lr 0.5", fedbuff(s, **uniform, server_lr=0.5), stragglers=2),
        RunSpec("K=4, server lr 0.25", fedbuff(s, **uniform, server_lr=0.25), stragglers=2),
        RunSpec(
            "K=8, server lr 0.5", fedbuff(s, **uniform, buffer_size=8, server_lr=0.5), stragglers=2
        ),
        RunSpec(
            "K=4, server lr 0.5, served EMA 0.8",
            fedbuff(s, **uniform, server_lr=0.5),
            stragglers=2,
            served_ema=0.8,
        ),
        RunSpec(
            "K=4, server lr 1, served EMA 0.8",
            fedbuff(s, **uniform),
            stragglers=2,
            served_ema=0.8,
        ),
        RunSpec(
            "K=4, FedAdam lr 0.001",
            fedbuff(s, **uniform, server_optimizer="adam", server_lr=0.001),
            stragglers=2,
        ),
        RunSpec(
            "K=4, FedAvgM 0.5 lr 0.25",
            fedbuff(s, **uniform, server_optimizer="momentum", server_momentum=0.5, server_lr=0.25),
            stragglers=2,
        ),
    ]


def _study_fedbuff(options: StudyOptions) -> tuple[str, StrategyConfig]:
    """FedBuff K=4 as the straggler and partition studies run it: its name and settings."""
    if options.uniform_weights:
        return "FedBuff K=4, uniform weights", fedbuff(options.seed, sample_weighted=False)
    return "FedBuff K=4", fedbuff(options.seed)


def stragglers(options: StudyOptions) -> list[RunSpec]:
    s = options.seed
    name, config = _study_fedbuff(options)
    return [
        RunSpec(f"{name}, 2 stragglers", config, stragglers=2),
        RunSpec("FedAsync a=0.6, 2 stragglers", fedasync(s), stragglers=2),
        RunSpec("FedAvg barrier, 2 stragglers", fedavg(s, options.sites), stragglers=2),
    ]


def partitions(options: StudyOptions) -> list[RunSpec]:
    s = options.seed
    cuts = (Partition("iid", seed=s), Partition(alpha=0.5, seed=s), Partition(alpha=0.1, seed=s))
    name, config = _study_fedbuff(options)
    return [RunSpec(f"{name}, {cut.label}", config, partition=cut) for cut in cuts]


def dp(options: StudyOptions) -> list[RunSpec]:
    s = options.seed
    runs = [RunSpec(f"FedBuff K={ROBUST_BUFFER}, no DP", fedbuff(s, buffer_size=ROBUST_BUFFER))]
    for z in options.noise:
        # DP's own defaults: constant staleness and uniform weights (fixed sensitivity).
        config = StrategyConfig(
            name="fedbuff", buffer_size=ROBUST_BUFFER, dp_noise_multiplier=z,
            dp_clip_norm=options.dp_clip, seed=s,
        )  # fmt: skip
        runs.append(RunSpec(f"DP C={options.dp_clip:g} z={z:g}", config))
    return runs


def byzantine(options: StudyOptions) -> list[RunSpec]:
    s = options.seed
    rules = {
        "mean": fedbuff(s, buffer_size=ROBUST_BUFFER),
        "median": fedbuff(s, buffer_size=ROBUST_BUFFER, aggregator="median"),
        "trimmed mean": fedbuff(
            s, buffer_size=ROBUST_BUFFER, aggregator="trimmed_mean", trim_fraction=TRIM_FRACTION
        ),
    }
    runs = []
    for rule, config in rules.items():
        runs.append(RunSpec(f"{rule}, clean", config))
        runs.append(RunSpec(f"{rule}, 2 x(-10)", config, attackers=2, attack_scale=-10.0))
        runs.append(RunSpec(f"{rule}, 2 sign-flip", config, attackers=2, attack_scale=-1.0))
    return runs


STUDIES: dict[str, Callable[[StudyOptions], list[RunSpec]]] = {
    "strategies": strategies,
    "stragglers": stragglers,
    "remedies": remedies,
    "stable": stable,
    "partitions": partitions,
    "dp": dp,
    "byzantine": byzantine,
}

TARGETS = (0.80, 0.85)
"""Accuracies whose time-to-reach every study reports."""
