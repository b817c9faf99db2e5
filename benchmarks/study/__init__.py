"""The learning study: federated strategies against a centralized baseline, in virtual time.

Real aggregator core, real strategies, real local training and evaluation on real data;
only the clock is simulated (docs/decisions/0006-study-in-virtual-time.md).

    uv run python -m benchmarks.study --help
"""
