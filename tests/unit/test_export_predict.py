"""`fedmq export` and `fedmq predict` on a ResNet-18 checkpoint and generated MedMNIST data."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from services.aggregator.checkpoint import Checkpoint, CheckpointStore
from services.aggregator.layout import ParamLayout
from services.cli import main
from services.common.data import load_site_dataset
from services.common.models import build_model, state_arrays
from services.common.training import evaluate, predict_logits
from services.export.card import read_card, sha256_of
from tests.datagen import write_medmnist_npz
from tests.support.dicom_files import VARIANTS, write_dicom

pytestmark = pytest.mark.slow

TASK = "export-unit"
MODEL = "resnet18"
VERSION = 7
OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


@dataclass(frozen=True)
class Exported:
    checkpoints: Path
    data_dir: Path
    out: Path
    model: torch.nn.Module


def _checkpoint(
    model: torch.nn.Module, version: int, strategy_state: dict[str, object]
) -> Checkpoint:
    arrays = state_arrays(model)
    layout = ParamLayout.from_arrays(arrays)
    return Checkpoint(
        version=version,
        weights=layout.flatten(arrays),
        integers={name: np.array(arrays[name]) for name in layout.integer_names},
        strategy_state=strategy_state,  # type: ignore[arg-type]
        applied_ids=[],
        updates_applied=3 * version,
        updates_rejected=0,
        fingerprint=f"{TASK}:{MODEL}:2:1:28",
    )


def _trained_model() -> torch.nn.Module:
    # Random weights with perturbed BatchNorm statistics: logits that differ per image.
    model = build_model(MODEL, num_classes=2, in_channels=1, image_size=28, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    root = tmp_path_factory.mktemp("export")
    data_dir = write_medmnist_npz(root / "data" / "pneumoniamnist.npz", sizes=(60, 40, 40)).parent
    model = _trained_model()
    store = CheckpointStore(root / "checkpoints" / TASK)
    store.save(_checkpoint(build_model(MODEL, num_classes=2, in_channels=1, image_size=28), 6, {}))
    store.save(_checkpoint(model, VERSION, {}))
    out = root / "model"
    code = main(
        ["export", str(store.directory), "--out", str(out), "--data-dir", str(data_dir),
         "--check-images", "32", "--torch-threads", "1"]
    )  # fmt: skip
    assert code == 0
    yield Exported(store.directory, data_dir, out, model)


def test_export_writes_weights_graph_and_a_card_describing_the_newest_checkpoint(
    exported: Exported,
) -> None:
    # Given a checkpoint directory with versions 6 and 7, exported by default
    card = read_card(exported.out)
    # Then the card names that version, the model, the classes and the preprocessing
    assert (card.task_id, card.version, card.updates_applied) == (TASK, VERSION, 21)
    assert card.architecture.name == MODEL and card.class_names == ["normal", "pneumonia"]
    assert card.preprocessing["channels"] == 1 and card.preprocessing["size"] == [28, 28]
    assert card.modalities == ["CR", "DX"] and card.differential_privacy is None
    # and the weights are the checkpoint's, hashed as the card says
    weights = load_file(str(exported.out / "model.safetensors"))
    for name, tensor in exported.model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    assert card.weights.sha256 == sha256_of(exported.out / "model.safetensors")
    assert card.onnx.sha256 == sha256_of(exported.out / "model.onnx")
    # and the ONNX graph agreed with torch on the real images it was checked on
    assert card.onnx_check.images == 32 and card.onnx_check.split == "test"
    assert card.onnx_check.max_abs_logit_difference <= 1e-4
    # and the test score is the evaluator's measure of that model
    test = load_site_dataset("medmnist:pneumoniamnist", split="test", data_dir=exported.data_dir)
    assert card.scores["test"].accuracy == evaluate(exported.model, test).accuracy


def test_predict_gives_the_evaluators_probabilities_for_png_and_every_dicom_variant(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 8 test images written as PNG and as DICOM in each variant
    test = load_site_dataset("medmnist:pneumoniamnist", split="test", data_dir=exported.data_dir)
    pixels = test.pixels[:8, 0].numpy()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        write_dicom(tmp_path / f"{i}.dcm", image, VARIANTS[i % len(VARIANTS)])
    # When predict classifies the folder
    code = main(["predict", str(exported.out), str(tmp_path), "--format", "json"])
    # Then every file equals the evaluator's inference on the same images
    assert code == 0
    rows = {Path(r["file"]).name: r for r in json.loads(capsys.readouterr().out)["predictions"]}
    logits, _ = predict_logits(exported.model, test.subset(np.arange(8)))
    expected = torch.softmax(logits.double(), dim=1).numpy()
    for i in range(8):
        for name in (f"{i}.png", f"{i}.dcm"):
            got = rows[name]["probabilities"]
            assert rows[name]["class_index"] == int(expected[i].argmax()), name
            assert abs(got["pneumonia"] - expected[i, 1]) <= 1e-5, name


def test_bad_files_get_one_line_each_while_the_good_ones_are_classified(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a good PNG, a truncated PNG, a DICOM without pixel data, an MR DICOM,
    # an RGB JPEG for this 1-channel model and a folder without images
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:100])
    write_dicom(tmp_path / "nopixels.dcm", image, "8bit-mono2", with_pixels=False)
    write_dicom(tmp_path / "brain.dcm", image, "8bit-mono2", modality="MR")
    Image.fromarray(np.stack([image] * 3, axis=-1)).save(tmp_path / "colour.jpg", quality=95)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    inputs = ["good.png", "truncated.png", "nopixels.dcm", "brain.dcm", "colour.jpg", "empty"]
    # When predict is given them all
    code = main(
        ["predict", str(exported.out), *(str(tmp_path / n) for n in inputs), "--format", "csv"]
    )
    out, err = capsys.readouterr()
    # Then it fails overall but classified the usable images, the RGB one with a note
    assert code == 1
    rows = out.strip().splitlines()
    assert rows[0] == "file,class,p_normal,p_pneumonia,notes"
    assert [Path(r.split(",")[0]).name for r in rows[1:]] == ["good.png", "colour.jpg"]
    assert "converted to greyscale" in rows[2] and "converted" not in rows[1]
    # and said why for each other input, one line each
    lines = err.strip().splitlines()
    assert re.search(r"truncated\.png: cannot decode the image: .*truncated", err)
    assert re.search(r"nopixels\.dcm: the DICOM file holds no pixel data", err)
    assert re.search(r"brain\.dcm: DICOM modality MR, but the model is for CR, DX", err)
    assert re.search(r"empty: no PNG, JPEG or DICOM images in the folder", err)
    assert lines[-1] == "fedmq predict: 4 failed, 2 classified"


def test_export_of_a_version_no_longer_kept_names_the_versions_there(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", str(exported.checkpoints), "--version", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "no checkpoint of version 3" in err and "holds versions [6, 7]" in err


def test_export_refuses_a_dp_checkpoint_without_its_noise_multiplier(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a checkpoint of central DP (4 noisy versions)
    store = CheckpointStore(tmp_path / "dp")
    store.save(_checkpoint(exported.model, 4, {"privacy/steps": 4}))
    # When it is exported without the noise multiplier, then nothing is written
    code = main(["export", str(store.directory), "--out", str(tmp_path / "out")])
    assert code == 1
    assert "--dp-noise-multiplier" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_a_directory_that_holds_something_else(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    code = main(["export", str(exported.checkpoints), "--out", str(tmp_path), "--overwrite"])
    assert code == 1 and (tmp_path / "thesis.tex").read_text() == "precious"
    assert "holds no earlier export" in capsys.readouterr().err


_BLOCK_FEDMQ = """
import importlib.abc, sys
class _NoFedmq(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("services", "schemas", "tests"):
            raise ImportError(f"{name} is fedmq: the snippet must not need it")
sys.meta_path.insert(0, _NoFedmq())
"""


def _snippets() -> list[str]:
    text = OPERATIONS.read_text()
    section = text[text.index("### Load the artifacts without fedmq") :]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[:2]


@pytest.mark.parametrize("which", ["pytorch", "onnxruntime"])
def test_the_documented_snippets_load_the_artifacts_without_fedmq(
    exported: Exported, tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the export and a 28 x 28 test image beside it
    snippet = _snippets()[0 if which == "pytorch" else 1]
    assert ("safetensors" in snippet) == (which == "pytorch")
    test = load_site_dataset("medmnist:pneumoniamnist", split="test", data_dir=exported.data_dir)
    image = exported.out / "image.png"
    Image.fromarray(test.pixels[5, 0].numpy()).save(image)
    try:
        # When the documented snippet runs where fedmq cannot be imported
        result = subprocess.run(
            [sys.executable, "-c", _BLOCK_FEDMQ + snippet],
            cwd=exported.out, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])
        # Then it prints what fedmq predict prints for that image
        assert main(["predict", str(exported.out), str(image), "--format", "json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["predictions"]
    finally:
        image.unlink()
    for name, probability in row["probabilities"].items():
        assert abs(printed[name] - probability) <= 1e-5, (name, printed, row)


def test_export_defaults_to_the_best_version_on_val_and_latest_is_the_newest(
    exported: Exported, tmp_path: Path
) -> None:
    from schemas import EvalReport, TaskSpec
    from services.aggregator.best import BestStore
    from services.export.source import find_source

    # Given checkpoints 6 and 7 and an evaluator that selected version 6 on val
    store = CheckpointStore(tmp_path / TASK)
    older = build_model(MODEL, num_classes=2, in_channels=1, image_size=28, seed=11)
    store.save(_checkpoint(older, 6, {}))
    store.save(_checkpoint(exported.model, VERSION, {}))
    spec = TaskSpec(task_id=TASK, model=MODEL, num_classes=2, dataset="medmnist:bloodmnist")
    validation = EvalReport(
        task_id=TASK, version=6, split="val", loss=0.4, accuracy=0.8,
        per_class_accuracy=(0.7, 0.9), num_examples=40, updates_applied=18,
    )  # fmt: skip
    BestStore(store.directory, spec=spec).offer(state_arrays(older), validation=validation)
    # When the directory is exported without a choice, then the best version is
    best = find_source(store.directory)
    assert (best.selection, best.checkpoint.version) == ("best-on-val", 6)
    assert best.data_source == "medmnist:bloodmnist"  # the task's own, from its spec
    assert best.recorded_scores is not None
    assert best.recorded_scores["validation"]["balanced_accuracy"] == pytest.approx(0.8)
    for name, array in best.state_arrays(best.model()).items():
        assert np.array_equal(array, older.state_dict()[name].numpy()), name
    # and --latest is the newest checkpoint
    newest = find_source(store.directory, latest=True)
    assert (newest.selection, newest.checkpoint.version) == ("latest", VERSION)


def test_an_image_folder_without_held_out_splits_checks_the_graph_but_claims_no_scores(
    exported: Exported, tmp_path: Path
) -> None:
    # Given a site's image folder (two classes, no val/ or test/) the model was trained on
    rng = np.random.default_rng(4)
    for label in ("normal", "pneumonia"):
        (tmp_path / "site" / label).mkdir(parents=True)
        for i in range(3):
            image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "site" / label / f"{i}.png")
    # When the checkpoint is exported against it
    source = f"folder:{tmp_path / 'site'}"
    out = tmp_path / "out"
    code = main(["export", str(exported.checkpoints), "--out", str(out), "--data-source", source])
    # Then the ONNX graph was checked on its images, no score is claimed, PIL's path is named
    assert code == 0
    card = read_card(out)
    assert card.onnx_check.split == "all" and card.onnx_check.images == 6
    assert card.scores == {} and card.preprocessing["pipeline"] == "pil"


def test_a_task_whose_ledger_counts_noisy_releases_needs_z_and_states_both_epsilons(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.aggregator.accounting import gaussian_epsilon
    from services.aggregator.privacy_ledger import PrivacyLedger
    from services.export.artifacts import ExportOptions, privacy_of
    from services.export.source import find_source

    # Given version 4 of a task whose ledger counts 9 published noisy versions, and whose
    # checkpoint file (as a best version's) carries no DP state
    store = CheckpointStore(tmp_path / "dp")
    store.save(_checkpoint(exported.model, 4, {}))
    PrivacyLedger(store.directory).record(9, epsilon=3.0)
    # When it is exported without z, then it is refused before anything is written
    assert main(["export", str(store.directory), "--out", str(tmp_path / "out")]) == 1
    assert "central DP (9 noisy versions)" in capsys.readouterr().err
    # and with z the card states this version's epsilon and that of everything published
    options = ExportOptions(out=tmp_path / "out", data_source="x", dp_noise_multiplier=1.1)
    privacy = privacy_of(find_source(store.directory), options)
    assert privacy is not None and (privacy.steps, privacy.published_steps) == (4, 9)
    assert privacy.epsilon == gaussian_epsilon(1.1, 4, 1e-5)
    assert privacy.epsilon_all_published == gaussian_epsilon(1.1, 9, 1e-5)
