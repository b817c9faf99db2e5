"""The evaluator: follows published models, evaluates them on held-out data, reports."""
