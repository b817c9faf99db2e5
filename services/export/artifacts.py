"""`fedmq export`: safetensors weights, an ONNX graph checked against torch, a model card.

The artifacts are written into a temporary directory next to the destination and renamed
into place only once the ONNX graph agreed with torch on real images, so a failed export
leaves nothing that looks like a model.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.aggregator.accounting import DEFAULT_DELTA, gaussian_epsilon
from services.common.data import ImageDataset, load_site_dataset
from services.common.data.preprocessing import Preprocessing
from services.common.models import parameter_count
from services.common.training import EvalResult, evaluate, predict_logits
from services.export.card import (
    CARD_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    Architecture,
    FileRef,
    ModelCard,
    OnnxCheck,
    Privacy,
    Scores,
    sha256_of,
    write_card,
)
from services.export.source import ExportSource

ONNX_OPSET = 20
"""The opset torch's exporter targets natively (re-targeting goes through a converter)."""
ONNX_TOLERANCE = 1e-4
"""Largest absolute logit difference between onnxruntime and torch an export accepts."""
DEFAULT_CHECK_IMAGES = 256
"""Real images of the check batch (the first of the test split, else of val)."""
SCORED_SPLITS = ("val", "test")
UNSCORED_SPLIT = "all"
"""Stands for an image folder without held-out splits: checks the graph, is not scored."""
KNOWN_MODALITIES: dict[str, list[str]] = {"medmnist:pneumoniamnist": ["CR", "DX"]}
"""DICOM modalities of the data a known source was made from (chest X-rays: CR, DX)."""


class ExportFailed(RuntimeError):
    """The export could not produce trustworthy artifacts; nothing was written."""


@dataclass(frozen=True)
class ExportOptions:
    """Where to write and what to check and record."""

    out: Path
    data_source: str
    data_dir: Path | None = None
    check_images: int = DEFAULT_CHECK_IMAGES
    modalities: tuple[str, ...] | None = None
    dp_noise_multiplier: float | None = None
    dp_delta: float = DEFAULT_DELTA
    overwrite: bool = False


@dataclass(frozen=True)
class ExportResult:
    """The directory written and its card."""

    directory: Path
    card: ModelCard
    seconds: float


def export_model(source: ExportSource, options: ExportOptions) -> ExportResult:
    """Write the three artifacts of `source` into `options.out`."""
    started = time.perf_counter()
    _check_destination(options.out, options.overwrite)
    privacy = privacy_of(source, options)
    model = source.model()
    f = source.fingerprint
    splits = _load_splits(options, f.in_channels, f.image_size)
    class_names = _class_names(splits, f.num_classes)
    scores = {
        split: _scores(split, evaluate(model, data))
        for split, data in splits.items()
        if split != UNSCORED_SPLIT
    }
    check_split, check_set = _check_set(splits, options.check_images)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=options.out.parent, prefix=".partial-export-"))
    try:
        weights = _write_safetensors(model, staging / WEIGHTS_FILE)
        onnx = _write_onnx(model, staging / ONNX_FILE, f.in_channels, f.image_size)
        check = check_onnx(model, staging / ONNX_FILE, check_set, split=check_split)
        card = ModelCard(
            fedmq_version=fedmq_version(),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            task_id=f.task_id,
            source=source.kind,
            selection=source.selection,
            version=source.checkpoint.version,
            updates_applied=source.checkpoint.updates_applied,
            contributing_sites=None,
            contributing_sites_note=_SITES_NOTE if source.kind == "federated" else None,
            data_source=options.data_source,
            class_names=class_names,
            architecture=Architecture(
                name=f.model,
                num_classes=f.num_classes,
                in_channels=f.in_channels,
                image_size=f.image_size,
                parameters=parameter_count(model),
            ),
            preprocessing=Preprocessing.for_source(
                options.data_source, channels=f.in_channels, size=f.image_size
            ).describe(),
            modalities=_modalities(options),
            scores=scores,
            recorded_scores=source.recorded_scores,
            differential_privacy=privacy,
            weights=weights,
            onnx=onnx,
            onnx_opset=ONNX_OPSET,
            onnx_check=check,
            inputs={
                "name": "images",
                "shape": ["batch", f.in_channels, f.image_size, f.image_size],
                "dtype": "float32",
            },
            outputs={"name": "logits", "shape": ["batch", f.num_classes], "dtype": "float32"},
        )
        write_card(staging, card)
        _move_into_place(staging, options.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(options.out, card, time.perf_counter() - started)


_SITES_NOTE = (
    "this fedmq version's checkpoints record the ids of applied updates, not of the sites"
    " that sent them"
)


def fedmq_version() -> str:
    """The installed fedmq distribution's version."""
    try:
        return package_version("fedmq")
    except PackageNotFoundError:
        return "unknown"


def check_onnx(model: nn.Module, onnx_path: Path, data: ImageDataset, *, split: str) -> OnnxCheck:
    """Run `data` through torch and onnxruntime; raise `ExportFailed` beyond the tolerance."""
    import onnxruntime

    expected, _ = predict_logits(model, data)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = torch.stack([data[i][0] for i in range(len(data))]).numpy()
    (actual,) = session.run(["logits"], {"images": images})
    difference = float(np.max(np.abs(np.asarray(actual) - expected.numpy())))
    if not difference <= ONNX_TOLERANCE:  # also refuses NaN
        raise ExportFailed(
            f"the ONNX graph disagrees with torch on {len(data)} {split} images: max abs logit"
            f" difference {difference:.3g} > {ONNX_TOLERANCE:g}; nothing was written"
        )
    return OnnxCheck(
        images=len(data),
        split=split,
        max_abs_logit_difference=difference,
        tolerance=ONNX_TOLERANCE,
        onnxruntime_version=onnxruntime.__version__,
    )


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportFailed(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportFailed(f"{out} is not empty: choose another --out or pass --overwrite")
    if not (out / CARD_FILE).is_file():
        # --overwrite replaces an earlier export, never a directory of something else.
        raise ExportFailed(f"{out} is not empty and holds no earlier export: choose another --out")


def _load_splits(options: ExportOptions, channels: int, size: int) -> dict[str, ImageDataset]:
    """The held-out splits of the data source (an image folder without them: all of it)."""
    from services.common.data import DatasetError

    splits: dict[str, ImageDataset] = {}
    for split in _held_out(options.data_source):
        try:
            splits[split] = load_site_dataset(
                options.data_source, split=split, data_dir=options.data_dir,
                channels=channels, size=size,
            )  # fmt: skip
        except DatasetError as error:
            if split == SCORED_SPLITS[-1] and not splits:
                raise ExportFailed(f"no real images to check the export with: {error}") from error
    return splits


def _held_out(data_source: str) -> tuple[str, ...]:
    if not data_source.startswith("folder:"):
        return SCORED_SPLITS
    # A folder without val/ and test/ is read whole (its images trained the model): it can
    # check the ONNX graph, but its scores would not be held-out ones.
    root = Path(data_source.removeprefix("folder:")).expanduser()
    present = tuple(split for split in SCORED_SPLITS if (root / split).is_dir())
    return present or (UNSCORED_SPLIT,)


def _class_names(splits: dict[str, ImageDataset], num_classes: int) -> list[str]:
    names = list(next(iter(splits.values())).class_names)
    if len(names) != num_classes:
        raise ExportFailed(
            f"the data source has {len(names)} classes, the model {num_classes}:"
            " pass the --data-source the model was trained on"
        )
    return names


def _check_set(splits: dict[str, ImageDataset], count: int) -> tuple[str, ImageDataset]:
    split = "test" if "test" in splits else next(iter(splits))
    data = splits[split]
    return split, data.subset(np.arange(min(count, len(data))))


def _scores(split: str, result: EvalResult) -> Scores:
    recalls = [None if math.isnan(a) else a for a in result.per_class_accuracy]
    defined = [a for a in recalls if a is not None]
    return Scores(
        split=split,
        num_examples=result.num_examples,
        accuracy=result.accuracy,
        balanced_accuracy=float(np.mean(defined)) if defined else None,
        auc=None if math.isnan(result.auc) else result.auc,
        loss=result.loss,
        per_class_accuracy=recalls,
    )


def _modalities(options: ExportOptions) -> list[str] | None:
    if options.modalities is not None:
        return sorted({m.upper() for m in options.modalities}) or None
    return KNOWN_MODALITIES.get(options.data_source)


def privacy_of(source: ExportSource, options: ExportOptions) -> Privacy | None:
    """Central DP of `source` for its card; `ExportFailed` when DP was used but z not given."""
    steps = source.dp_steps
    published = (source.kind == "federated" and source.published_releases) or 0
    z = options.dp_noise_multiplier
    if steps is None and not published and z is None:
        return None
    if z is None:
        noisy = steps if steps is not None else published
        raise ExportFailed(
            f"the model was trained with central DP ({noisy} noisy versions): pass"
            " --dp-noise-multiplier (and --dp-delta) so the card can state epsilon"
        )
    # Without DP state in the checkpoint (the best version's file), every version up to
    # this one counts as one noisy release.
    releases = steps if steps is not None else source.checkpoint.version
    total = max(published, releases)
    return Privacy(
        epsilon=gaussian_epsilon(z, releases, options.dp_delta),
        delta=options.dp_delta,
        noise_multiplier=z,
        steps=releases,
        published_steps=total,
        epsilon_all_published=gaussian_epsilon(z, total, options.dp_delta),
    )


def _write_safetensors(model: nn.Module, path: Path) -> FileRef:
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return FileRef(file=path.name, sha256=sha256_of(path), format="safetensors")


def _write_onnx(model: nn.Module, path: Path, channels: int, size: int) -> FileRef:
    sample = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch")
    # The exporter reports its progress on stdout; keep the command's output its own.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model, (sample,), dynamo=True, opset_version=ONNX_OPSET,
            input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: batch},), external_data=False,
        )  # fmt: skip
    if program is None:
        raise ExportFailed("torch.onnx.export returned no program")
    program.save(str(path))
    return FileRef(file=path.name, sha256=sha256_of(path), format=f"onnx (opset {ONNX_OPSET})")


def _move_into_place(staging: Path, out: Path) -> None:
    # mkdtemp (and the safetensors writer) create owner-only entries; an export is for sharing.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)
    if out.is_dir():
        shutil.rmtree(out)
    staging.rename(out)
