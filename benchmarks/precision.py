"""Transport precision (fp32, fp16, bf16): bytes per update, ingest rate, final accuracy.

    uv run python -m benchmarks.precision [--rounds 6] [--local-steps 30] [--updates 120]
        [--data-dir DIR] [--skip-accuracy] [--skip-ingest] [--out precision.json]

- Wire size: one encoded cnn-small and one ResNet-18 update per precision.
- Ingest: `fedmq aggregator` (FedAsync, default cadence) draining preloaded updates of each
  precision, next to a bare consumer draining the same bytes (as in benchmarks.ingest).
- Accuracy: an in-process FedBuff (K = sites) federation on real PneumoniaMNIST: real local
  training (services.trainer), every update through the real codec (encode, decode) and the
  real aggregator core; the same seeds for every precision, so only the transport differs.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks.harness import DEFAULT_CADENCE, MIB, UpdateFactory, emit, machine, parser
from benchmarks.ingest import aggregator_drain, baseline
from schemas import GlobalModel, ModelUpdate, Precision, decode, encode

PRECISIONS: tuple[Precision, ...] = ("float32", "float16", "bfloat16")
DATASET = "medmnist:pneumoniamnist"
SITES = 4


def wire_sizes(models: list[str]) -> list[dict[str, Any]]:
    """Encoded bytes of one update per model and precision."""
    rows = []
    for model in models:
        sizes = {p: _encoded_size(model, p) for p in PRECISIONS}
        for precision, size in sizes.items():
            rows.append(
                {
                    "model": model,
                    "precision": precision,
                    "message_bytes": size,
                    "fraction_of_float32": round(size / sizes["float32"], 3),
                }
            )
    return rows


def _encoded_size(model: str, precision: Precision) -> int:
    return len(encode(UpdateFactory("t", model, precision=precision).update("s")))


def ingest_rates(count: int) -> list[dict[str, Any]]:
    """Aggregator drain rate per precision next to a bare drain of the same-size bytes."""
    rows = []
    for precision in PRECISIONS:
        bodies = UpdateFactory("bench-bare", "cnn-small", precision=precision).bodies(count)
        bare_s = baseline(bodies, prefetch=DEFAULT_CADENCE.window(len(bodies[0])))
        agg_s, details = aggregator_drain(
            "cnn-small", "fedasync", DEFAULT_CADENCE, count, precision=precision
        )
        rows.append(
            {
                "precision": precision,
                "message_mib": details["message_mib"],
                "bare_updates_s": round(count / bare_s, 1),
                "aggregator_updates_s": round(count / agg_s, 1),
                "aggregator_mib_s": round(details["message_mib"] * count / agg_s, 1),
                "fraction_of_bare": round(bare_s / agg_s, 3),
                "rejected": details["rejected"],
            }
        )
    return rows


def federated_accuracy(
    precision: Precision, *, rounds: int, local_steps: int, data_dir: Path | None
) -> dict[str, Any]:
    """Test accuracy/AUC after `rounds` FedBuff steps of `SITES` sites, at one precision."""
    from services.aggregator.bootstrap import load_core
    from services.aggregator.checkpoint import CheckpointStore
    from services.aggregator.task import TaskDefinition
    from services.common.data import load_dataset, load_site_dataset
    from services.common.training import evaluate
    from services.trainer.local_model import LocalModel
    from services.trainer.local_round import build_update, round_seed, run_local_round

    task = TaskDefinition.model_validate(
        {
            "spec": {"task_id": "precision", "model": "cnn-small", "num_classes": 2,
                     "local_steps": local_steps, "precision": precision,
                     "optimizer": "adam", "learning_rate": 0.001},
            "strategy": {"name": "fedbuff", "buffer_size": SITES},
        }
    )  # fmt: skip
    sites = [
        load_site_dataset(DATASET, data_dir=data_dir, site=i, num_sites=SITES, seed=0)
        for i in range(SITES)
    ]
    test = load_dataset(DATASET, split="test", data_dir=data_dir)
    with tempfile.TemporaryDirectory() as scratch:
        core = load_core(task, CheckpointStore(Path(scratch)))
    local = LocalModel(task.spec)
    wire_bytes = 0
    for round_index in range(rounds):
        model = decode(encode(core.global_model()), accept=(GlobalModel,))
        for site, data in enumerate(sites):
            local.load_global(model)
            seed = round_seed(site, round_index)
            result = run_local_round(local, data, seed=seed, stop=threading.Event())
            body = encode(build_update(local, result, trainer_id=f"site-{site}"))
            wire_bytes += len(body)
            core.submit(decode(body, accept=(ModelUpdate,)), redelivered=False, now=0.0)
    local.load_global(core.global_model())
    scores = evaluate(local.model, test)
    return {
        "precision": precision,
        "versions": core.version,
        "test_accuracy": round(scores.accuracy, 4),
        "test_auc": round(scores.auc, 4),
        "mib_sent": round(wire_bytes / MIB, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args_parser = parser(__doc__)
    args_parser.add_argument("--rounds", type=int, default=6)
    args_parser.add_argument("--local-steps", type=int, default=30)
    args_parser.add_argument("--updates", type=int, default=120)
    args_parser.add_argument("--data-dir", type=Path, default=None)
    args_parser.add_argument("--wire-models", default="cnn-small,resnet18")
    args_parser.add_argument("--skip-accuracy", action="store_true")
    args_parser.add_argument("--skip-ingest", action="store_true")
    args = args_parser.parse_args(argv)
    started = machine()
    report: dict[str, Any] = {"benchmark": "precision", "machine_at_start": started}
    report["wire"] = wire_sizes(args.wire_models.split(","))
    if not args.skip_ingest:
        report["ingest"] = ingest_rates(args.updates)
    if not args.skip_accuracy:
        report["accuracy"] = {
            "setup": f"in-process FedBuff K={SITES}, {SITES} IID sites, cnn-small, Adam 1e-3,"
            f" {args.local_steps} local steps x {args.rounds} rounds, real codec round trip",
            "results": [
                federated_accuracy(
                    p, rounds=args.rounds, local_steps=args.local_steps, data_dir=args.data_dir
                )
                for p in PRECISIONS
            ],
        }
    report["machine_at_end"] = machine()
    return emit(report, args.out)


if __name__ == "__main__":
    main()
