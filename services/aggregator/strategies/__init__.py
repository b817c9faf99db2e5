"""Pure aggregation strategies: how admitted deltas become a new global model (no I/O)."""

from services.aggregator.strategies.base import (
    Admission,
    Contribution,
    InadmissibleContribution,
    Rejection,
    StateDict,
    StepResult,
    Strategy,
)
from services.aggregator.strategies.factory import StrategyConfig, build_strategy
from services.aggregator.strategies.fedasync import FedAsync
from services.aggregator.strategies.fedavg import FedAvg
from services.aggregator.strategies.fedbuff import BufferedStrategy, FedBuff
from services.aggregator.strategies.privacy import GaussianAggregateNoise
from services.aggregator.strategies.server_optimizers import (
    ServerAdam,
    ServerMomentum,
    ServerOptimizer,
    ServerSGD,
)
from services.aggregator.strategies.staleness import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    StalenessFunction,
    staleness_function,
)

__all__ = [
    "Admission",
    "BufferedStrategy",
    "ConstantStaleness",
    "Contribution",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "GaussianAggregateNoise",
    "HingeStaleness",
    "InadmissibleContribution",
    "PolynomialStaleness",
    "Rejection",
    "ServerAdam",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSGD",
    "StalenessFunction",
    "StateDict",
    "StepResult",
    "Strategy",
    "StrategyConfig",
    "build_strategy",
    "staleness_function",
]
