"""Export a ResNet-18 and predict 1,000 real images: time and peak memory, with baselines.

    uv run python -m benchmarks.export_predict [--images 1000] [--out result.json]

Every step runs as its own process (`fedmq export`, `fedmq predict`, and the baselines), so
its peak resident memory is that process's own (`wait4`). Baselines measured in the same
run: a bare `torch.onnx.export` of the same model (what `fedmq export` adds to it: scoring on
val/test, safetensors, the onnxruntime check, the card) and a bare forward pass of the same
weights over the same images already decoded and normalised (what `fedmq predict` adds:
decoding files, DICOM display pipeline, preprocessing, output), plus `import torch` alone;
the reading and preprocessing of the files is also timed on its own, in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.harness import emit, machine, parser
from services.aggregator.checkpoint import Checkpoint, CheckpointStore
from services.aggregator.layout import ParamLayout
from services.common.data import load_medmnist
from services.common.models import build_model, state_arrays

MIB = 1024 * 1024
MODEL = "resnet18"
TASK = "bench-export"
DICOM_EVERY = 2
"""Every second image is written as a 16-bit rescaled DICOM, the others as PNG."""

_ONNX_BASELINE = """
import sys, torch
from safetensors.torch import load_file
from services.common.models import build_model
model = build_model("resnet18", num_classes=2, in_channels=1, image_size=28).eval()
model.load_state_dict(load_file(sys.argv[1]))
torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), sys.argv[2], dynamo=True,
                  dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
"""

_FORWARD_BASELINE = """
import sys, numpy as np, torch
from safetensors.torch import load_file
from services.common.models import build_model
model = build_model("resnet18", num_classes=2, in_channels=1, image_size=28).eval()
model.load_state_dict(load_file(sys.argv[1]))
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.inference_mode():
    for batch in torch.split(x, 256):
        torch.softmax(model(batch).double(), dim=1)
"""


def _run(args: list[str]) -> dict[str, float]:
    """Run one process; its wall time and its own peak resident memory."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        error = process.stderr.read().decode() if process.stderr else ""
        raise RuntimeError(f"{args[:4]} failed ({process.returncode}): {error[-2000:]}")
    if process.stderr:
        process.stderr.close()
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _checkpoint_dir(root: Path) -> Path:
    model = build_model(MODEL, num_classes=2, in_channels=1, image_size=28, seed=0)
    arrays = state_arrays(model)
    layout = ParamLayout.from_arrays(arrays)
    store = CheckpointStore(root / TASK)
    store.save(
        Checkpoint(
            version=1,
            weights=layout.flatten(arrays),
            integers={n: np.array(arrays[n]) for n in layout.integer_names},
            strategy_state={},
            applied_ids=[],
            updates_applied=0,
            updates_rejected=0,
            fingerprint=f"{TASK}:{MODEL}:2:1:28",
        )
    )
    return store.directory


def _write_images(root: Path, count: int, data_dir: str | None) -> tuple[Path, Path]:
    from tests.support.dicom_files import write_dicom

    pixels = np.concatenate(
        [load_medmnist("pneumoniamnist", s, data_dir=data_dir).pixels[:, 0].numpy()
         for s in ("test", "val", "train")]
    )[:count]  # fmt: skip
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(pixels):
        if i % DICOM_EVERY:
            write_dicom(folder / f"{i:04d}.dcm", image, "16bit-rescaled-mono1")
        else:
            Image.fromarray(image).save(folder / f"{i:04d}.png")
    normalised = root / "normalised.npy"
    np.save(normalised, (pixels[:, None].astype(np.float32) / 127.5 - 1.0))
    return folder, normalised


def _decode_and_preprocess(folder: Path) -> float:
    """Seconds to read every file and preprocess it, in this process: predict minus forward."""
    from services.common.data.preprocessing import Preprocessing
    from services.export.images import read_image

    started = time.perf_counter()
    pixels = [read_image(path).pixels for path in sorted(folder.iterdir())]
    Preprocessing(channels=1, size=28, pipeline="tensor").dataset(pixels)
    return time.perf_counter() - started


def run(images: int, data_dir: str | None) -> dict[str, Any]:
    """Every measurement, as one JSON-ready document."""
    python = [sys.executable]
    fedmq = [*python, "-m", "services.cli"]
    data = ["--data-dir", data_dir] if data_dir else []
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-export-") as temp:
        root = Path(temp)
        checkpoints = _checkpoint_dir(root)
        folder, normalised = _write_images(root, images, data_dir)
        model = root / "model"
        decode_seconds = _decode_and_preprocess(folder)
        import_torch = _run([*python, "-c", "import torch"])
        export = _run([*fedmq, "export", str(checkpoints), "--out", str(model), *data])
        weights = str(model / "model.safetensors")
        onnx_alone = _run([*python, "-c", _ONNX_BASELINE, weights, str(root / "b.onnx")])
        predict = _run([*fedmq, "predict", str(model), str(folder), "--format", "csv"])
        forward = _run([*python, "-c", _FORWARD_BASELINE, weights, str(normalised)])
        card = json.loads((model / "model_card.json").read_text())
        sizes = {p.name: round(p.stat().st_size / MIB, 1) for p in sorted(model.iterdir())}
    return {
        "benchmark": "export_predict",
        "model": MODEL,
        "images": images,
        "inputs": f"{images - images // DICOM_EVERY} PNG + {images // DICOM_EVERY} DICOM"
        " (16-bit, rescaled, MONOCHROME1), real PneumoniaMNIST pixels, 28 x 28",
        "machine": machine(),
        "torch_threads": "default",
        "export": export,
        "export_onnx_check_max_abs_diff": card["onnx_check"]["max_abs_logit_difference"],
        "artifact_mib": sizes,
        "predict": predict,
        "decode_and_preprocess_in_process_s": round(decode_seconds, 2),
        "decode_and_preprocess_ms_per_image": round(1000 * decode_seconds / images, 3),
        "baseline_import_torch": import_torch,
        "baseline_onnx_export_alone": onnx_alone,
        "baseline_forward_only": forward,
        "export_vs_onnx_export_alone": round(export["seconds"] / onnx_alone["seconds"], 2),
        "predict_vs_forward_only": round(predict["seconds"] / forward["seconds"], 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run, print (and optionally write) the JSON report."""
    arguments = parser(__doc__)
    arguments.add_argument("--images", type=int, default=1000)
    arguments.add_argument("--data-dir", help="directory holding pneumoniamnist.npz")
    args = arguments.parse_args(argv)
    return emit(run(args.images, args.data_dir), args.out)


if __name__ == "__main__":
    main()
