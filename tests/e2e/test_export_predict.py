"""A real federation's model exported and used: predict agrees with its evaluator (PNG, DICOM)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from services.aggregator.best import load_best
from services.cli import main
from services.common.data import load_site_dataset
from services.common.models import build_model, load_state_arrays
from services.common.training import evaluate, predict_logits
from services.demo.federation import Federation, FederationPlan
from services.export.card import read_card
from tests.conftest import require_broker
from tests.datagen import pneumonia_npz
from tests.support.dicom_files import VARIANTS, write_dicom

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.slow]

IMAGES = 200
SELECTED_AFTER_VERSION = 2
"""Wait for a selected version this far in: trained, not the initial model."""
FEDERATION_TIMEOUT_S = 420.0


def _test_reports(eval_log: Path) -> dict[int, dict[str, Any]]:
    if not eval_log.exists():
        return {}
    lines = [json.loads(line) for line in eval_log.read_text().splitlines() if line.strip()]
    return {line["version"]: line for line in lines if line["split"] == "test"}


def _wait_for_a_trained_best(task_dir: Path, eval_log: Path) -> None:
    deadline = time.monotonic() + FEDERATION_TIMEOUT_S
    while time.monotonic() < deadline:
        best = load_best(task_dir) if (task_dir / "best" / "best.json").exists() else None
        selected = best is not None and best.version >= SELECTED_AFTER_VERSION
        if selected and best is not None and best.version in _test_reports(eval_log):
            return
        time.sleep(1.0)
    raise AssertionError(f"no version >= {SELECTED_AFTER_VERSION} selected on val in time")


def _predict_json(model: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> list[Any]:
    capsys.readouterr()  # what the federation and the export printed before
    assert main(["predict", str(model), str(folder), "--format", "json"]) == 0
    predictions: list[Any] = json.loads(capsys.readouterr().out)["predictions"]
    return predictions


def test_a_federated_model_exported_classifies_png_and_dicom_as_its_evaluator_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a short real federation (broker, aggregator, evaluator, two trainers)
    amqp_url = require_broker()
    npz = pneumonia_npz(tmp_path / "data")
    plan = FederationPlan(
        task_id=f"export-{uuid.uuid4().hex[:8]}",
        run_dir=tmp_path / "run",
        trainers=2,
        partition="iid",
        data_dir=npz.parent,
        amqp_url=amqp_url,
        aggregator_flags=("--buffer-size", "2", "--local-steps", "8"),
    )
    federation = Federation(plan)
    task_dir = plan.run_dir / "checkpoints" / plan.task_id
    federation.start()
    try:
        _wait_for_a_trained_best(task_dir, federation.eval_log)
    finally:
        codes = federation.stop()
    assert all(code == 0 for code in codes.values()), codes
    # When its best version on val is exported
    out = tmp_path / "model"
    assert main(["export", str(task_dir), "--out", str(out), "--data-dir", str(npz.parent)]) == 0
    card = read_card(out)
    best = load_best(task_dir)
    assert best is not None
    assert (card.selection, card.version) == ("best-on-val", best.version)
    # Then the evaluator's own model of that version scores what the evaluator logged
    evaluator_model = build_model(
        card.architecture.name, num_classes=2, in_channels=1, image_size=28
    ).eval()
    load_state_arrays(evaluator_model, best.state_arrays())
    test = load_site_dataset("medmnist:pneumoniamnist", split="test", data_dir=npz.parent)
    logged = _test_reports(federation.eval_log)[best.version]
    assert evaluate(evaluator_model, test).accuracy == logged["accuracy"]
    assert card.scores["test"].accuracy == logged["accuracy"]
    # Given 200 test images written as PNG and as DICOM (8/16-bit, MONOCHROME1/2)
    pixels = test.pixels[:IMAGES, 0].numpy()
    (tmp_path / "png").mkdir()
    (tmp_path / "dicom").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "png" / f"{i:03d}.png")
        write_dicom(tmp_path / "dicom" / f"{i:03d}.dcm", image, VARIANTS[i % len(VARIANTS)])
    # When predict classifies both folders
    by_format = {kind: _predict_json(out, tmp_path / kind, capsys) for kind in ("png", "dicom")}
    # Then labels equal the evaluator's and probabilities are within 1e-5, in both formats
    logits, _ = predict_logits(evaluator_model, test.subset(np.arange(IMAGES)))
    expected = torch.softmax(logits.double(), dim=1).numpy()
    labels = logits.argmax(1).numpy()
    for kind, rows in by_format.items():
        assert [Path(r["file"]).stem for r in rows] == [f"{i:03d}" for i in range(IMAGES)]
        got = np.array([[r["probabilities"][n] for n in card.class_names] for r in rows])
        assert np.array_equal([r["class_index"] for r in rows], labels), kind
        assert np.max(np.abs(got - expected)) <= 1e-5, kind
    assert len(set(labels.tolist())) == 2  # a trained model, not one answer for all
    # and the ONNX graph gives torch's logits on those images
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    batch = torch.stack([test[i][0] for i in range(IMAGES)]).numpy()
    (onnx_logits,) = session.run(["logits"], {"images": batch})
    assert np.max(np.abs(onnx_logits - logits.numpy())) <= 1e-4
    assert card.onnx_check.max_abs_logit_difference <= 1e-4
