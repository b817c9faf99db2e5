"""`python -m benchmarks.study <study>`: arguments, then run, write and print the study."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.study.data import StudyData
from benchmarks.study.output import (
    markdown_table,
    summary_document,
    write_figure,
    write_json,
)
from benchmarks.study.runner import RunOutcome, run_one, slug, time_model
from benchmarks.study.spec import LocalRecipe, StudySettings
from benchmarks.study.studies import DEFAULT_DP_CLIP, DEFAULT_NOISE, STUDIES, StudyOptions
from benchmarks.study.timing import TimeModel

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = {"cnn-small": 40.0, "cnn-small-gn": 40.0, "resnet18": 240.0}
"""Virtual seconds per run; real time is about sites x budget (every site computes here)."""
DEFAULT_EVAL_EVERY_S = {"cnn-small": 1.0, "cnn-small-gn": 1.0, "resnet18": 10.0}

DEFAULT_THREADS = 1
"""On 2 shared cores one intra-op thread trained cnn-small 3x faster than two (contention)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.study",
        description="Federated vs centralized on PneumoniaMNIST, in virtual time "
        "(docs/decisions/0006-study-in-virtual-time.md).",
    )
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--model", default="cnn-small", choices=sorted(DEFAULT_BUDGET_S))
    parser.add_argument("--budget", type=float, help="virtual seconds per run")
    parser.add_argument("--eval-every", type=float, help="virtual seconds between evaluations")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory of pneumoniamnist.npz (default: the usual lookup, then the bundled copy)",
    )
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-steps", type=int, default=LocalRecipe.steps)
    parser.add_argument("--lr", type=float, default=LocalRecipe.learning_rate)
    parser.add_argument(
        "--logit-adjustment", type=float, default=LocalRecipe.logit_adjustment,
        help="tau of the logit-adjusted loss (sites and centralized alike)",
    )  # fmt: skip
    parser.add_argument(
        "--uniform-weights", action="store_true",
        help="FedBuff weighs updates alike in the straggler and partition studies",
    )  # fmt: skip
    parser.add_argument("--bandwidth", type=float, default=100.0, help="Mbit/s per site")
    parser.add_argument(
        "--seconds-per-sample", type=float, help="pin the speed instead of measuring it"
    )
    parser.add_argument("--noise", type=_floats, default=DEFAULT_NOISE, help="DP z values")
    parser.add_argument("--dp-clip", type=float, default=DEFAULT_DP_CLIP)
    parser.add_argument("--only", type=_names, help="comma-separated run names (or slugs)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs" / "study")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--figures-dir", type=Path, default=REPO_ROOT / "docs" / "figures")
    parser.add_argument("--tag", default="", help="suffix of the output names")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = StudySettings(
        model=args.model,
        budget_s=args.budget or DEFAULT_BUDGET_S[args.model],
        eval_every_s=args.eval_every or DEFAULT_EVAL_EVERY_S[args.model],
        sites=args.sites,
        seed=args.seed,
        recipe=LocalRecipe(
            steps=args.local_steps, learning_rate=args.lr, logit_adjustment=args.logit_adjustment
        ),
        bandwidth_mbit_s=args.bandwidth,
    )
    options = StudyOptions(
        seed=args.seed, noise=args.noise, dp_clip=args.dp_clip, sites=args.sites,
        uniform_weights=args.uniform_weights,
    )  # fmt: skip
    specs = STUDIES[args.study](options)
    if args.only:
        specs = [s for s in specs if s.name in args.only or slug(s.name) in args.only]
    data = StudyData.load(args.data_dir)
    timing = time_model(settings, data, seconds_per_sample=args.seconds_per_sample)
    name = f"study-{args.study}-{args.model}{args.tag}"
    _progress(f"{name}: {timing.seconds_per_sample * 1e3:.3f} ms per sample, {len(specs)} runs")
    outcomes = []
    for spec in specs:
        outcomes.append(run_one(spec, settings, data, timing, args.runs_dir / name))
        _progress(_line(outcomes[-1]))
    header = _header(args, settings, timing, name, argv)
    write_json(args.results_dir / f"{name}.json",
               {**header, "runs": [o.to_json() for o in outcomes]})  # fmt: skip
    write_json(args.figures_dir / f"{name}.json", summary_document(header, outcomes))
    title = f"{args.study}: {args.model}, {args.sites} sites (virtual time)"
    write_figure(outcomes, args.figures_dir / f"{name}.png", title=title)
    print(markdown_table(outcomes), file=sys.stderr)
    print(json.dumps(summary_document(header, outcomes), default=str))
    return 0


def _header(
    args: argparse.Namespace,
    settings: StudySettings,
    timing: TimeModel,
    name: str,
    argv: Sequence[str] | None,
) -> dict[str, Any]:
    words = list(argv) if argv is not None else sys.argv[1:]
    return {
        "study": args.study,
        "name": name,
        "command": "uv run python -m benchmarks.study " + shlex.join(words),
        "settings": asdict(settings),
        "time_model": {**asdict(timing), "transfer_seconds": timing.transfer_seconds},
        "torch_threads": torch.get_num_threads(),
    }


def _line(outcome: RunOutcome) -> str:
    s = outcome.summary
    reach = ", ".join(
        f"t({t['target']:.2f})={'-' if t['seconds'] is None else round(t['seconds'], 1)}"
        for t in s["targets"]
    )
    return (
        f"  {outcome.spec.name}: best {s['best_accuracy']:.3f}, final {s['final_accuracy']:.3f}"
        f" / AUC {s['final_auc'] or 0:.3f}, {reach} ({outcome.real_seconds:.0f} s real)"
    )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str) -> set[str]:
    return {x.strip() for x in text.split(",") if x.strip()}
