"""`fedmq export` and `fedmq predict`: take the trained model out, and use it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_DATA_SOURCE = "medmnist:pneumoniamnist"
OUTPUT_FORMATS = ("table", "json", "csv")


def register(subcommands: Any) -> None:
    """Add `fedmq export` and `fedmq predict` to the CLI."""
    _register_export(subcommands)
    _register_predict(subcommands)


def _register_export(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "export",
        help="write a checkpoint as safetensors + ONNX + model card",
        description=(
            "Export one model version from a task's checkpoint directory "
            "(<checkpoint dir>/<task id>; by default the evaluator's best version on val, "
            "kept in its best/) or a `fedmq centralized` run directory: "
            "model.safetensors, model.onnx (checked against torch with onnxruntime on "
            "real images) and model_card.json (architecture, classes, preprocessing, "
            "scores, provenance, hashes)."
        ),
    )
    parser.add_argument("source", type=Path, metavar="CHECKPOINTS", help="checkpoint or run dir")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="export exactly this version")
    which.add_argument(
        "--latest", action="store_true", help="the newest checkpoint, not the best on val"
    )
    parser.add_argument(
        "--data-source",
        help="the task's medmnist:<name> or folder:<path>: class names, scores, the ONNX "
        f"check (default: the run's own, else {DEFAULT_DATA_SOURCE})",
    )
    parser.add_argument("--data-dir", type=Path, help="directory of MedMNIST .npz files")
    parser.add_argument(
        "--check-images", type=int, default=256, help="real images of the ONNX check"
    )
    parser.add_argument(
        "--modality",
        action="append",
        help="DICOM modality the model is for (repeat; default: known for the data source)",
    )
    parser.add_argument("--dp-noise-multiplier", type=float, help="central DP's z, if used")
    parser.add_argument("--dp-delta", type=float, help="delta of the stated epsilon")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads")
    parser.set_defaults(func=run_export)


def _register_predict(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "predict",
        help="classify PNG/JPEG/DICOM images with an exported model",
        description=(
            "Classify image files (PNG, JPEG, DICOM) and folders of them with a model "
            "written by `fedmq export`, preprocessed exactly as its model card says. A file "
            "that cannot be used gets one line on stderr and the others go on; the exit "
            "status is 1 when any file failed."
        ),
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="directory from fedmq export")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads")
    parser.set_defaults(func=run_predict)


def run_export(args: argparse.Namespace) -> int:
    """Export; prints where the artifacts went and the ONNX check, 1 on failure."""
    import torch

    from services.aggregator.accounting import DEFAULT_DELTA
    from services.common.data import DatasetError
    from services.export.artifacts import ExportFailed, ExportOptions, export_model
    from services.export.source import SourceError, find_source

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    try:
        source = find_source(args.source, version=args.version, latest=args.latest)
        options = ExportOptions(
            out=args.out,
            data_source=args.data_source or source.data_source or DEFAULT_DATA_SOURCE,
            data_dir=args.data_dir,
            check_images=args.check_images,
            modalities=None if args.modality is None else tuple(args.modality),
            dp_noise_multiplier=args.dp_noise_multiplier,
            dp_delta=args.dp_delta if args.dp_delta is not None else DEFAULT_DELTA,
            overwrite=args.overwrite,
        )
        result = export_model(source, options)
    except (SourceError, ExportFailed, DatasetError, ValueError, OSError) as error:
        print(f"fedmq export: {error}", file=sys.stderr)
        return 1
    card = result.card
    check = card.onnx_check
    test = card.scores.get("test")
    print(
        f"exported {card.task_id} version {card.version} ({card.selection}, "
        f"{card.architecture.name}) to {result.directory} in {result.seconds:.1f} s\n"
        f"ONNX agrees with torch on {check.images} {check.split} images: max abs logit "
        f"difference {check.max_abs_logit_difference:.2e} (limit {check.tolerance:g})\n"
        + (f"test accuracy {test.accuracy:.4f}, AUC {test.auc}\n" if test else "")
        + f"weights sha256 {card.weights.sha256}"
    )
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Classify the inputs; 1 when any file failed, 2 when the model cannot be loaded."""
    import torch

    from services.export.card import CardError
    from services.export.predict import load_predictor, predict_paths
    from services.export.report import print_failures, write_predictions

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    try:
        predictor = load_predictor(args.model)
    except (CardError, OSError, ValueError) as error:
        print(f"fedmq predict: {error}", file=sys.stderr)
        return 2
    outcome = predict_paths(predictor, args.inputs, batch_size=args.batch_size)
    write_predictions(outcome, predictor.card.class_names, args.format, sys.stdout)
    print_failures(outcome, sys.stderr)
    return 1 if outcome.failures else 0
