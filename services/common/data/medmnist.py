"""MedMNIST `.npz` files: registry, lookup, checksum-verified download, layout validation.

Where `<name>.npz` is looked for, in order: the explicit data directory (`data_dir`, else
`$FEDMQ_DATA_DIR`), `~/.medmnist`, the copy bundled with fedmq (PneumoniaMNIST only), and
last a download into the first of those directories. A file the user placed is used as
it is (copies and re-exports of MedMNIST differ from the official bytes); the bundled copy
and what this module downloads are verified against their checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import numpy.typing as npt
import structlog

from services.common.data.dataset import (
    ChecksumMismatch,
    DatasetNotFound,
    ImageDataset,
    InvalidDatasetFile,
)

log = structlog.get_logger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")

DATA_DIR_ENV = "FEDMQ_DATA_DIR"
"""Environment variable naming the directory that holds `<name>.npz` files."""

DOWNLOAD_TIMEOUT_S = 60.0
"""Socket timeout of one download read; a stalled mirror fails instead of hanging a trainer."""

DOWNLOAD_CHUNK_BYTES = 1 << 20

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_+-]*$")
_ZENODO_V2 = "https://zenodo.org/record/6496656/files/{}.npz?download=1"


BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
"""Datasets shipped inside the package (see its README.md for provenance and licence)."""


class DownloadFailed(DatasetNotFound):
    """The network fetch itself failed (unreachable host, HTTP error, timeout)."""


@dataclass(frozen=True)
class Checksum:
    """A published digest of a file."""

    algorithm: Literal["sha256", "md5"]
    hexdigest: str


@dataclass(frozen=True)
class MedMnistFile:
    """Where a MedMNIST dataset is published and what it contains."""

    url: str
    checksum: Checksum
    channels: int
    class_names: tuple[str, ...]
    bundled: Checksum | None = None
    """Digest of the copy shipped in `BUNDLED_DIR`, for datasets that ship with fedmq."""

    @property
    def num_classes(self) -> int:
        """Number of classes of the single-label task."""
        return len(self.class_names)


_ORGANS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
)  # fmt: skip


def _v2(name: str, md5: str, channels: int, class_names: tuple[str, ...]) -> MedMnistFile:
    return MedMnistFile(_ZENODO_V2.format(name), Checksum("md5", md5), channels, class_names)


MEDMNIST_FILES: dict[str, MedMnistFile] = {
    "pneumoniamnist": MedMnistFile(
        url="https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        checksum=Checksum(
            "sha256", "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8"
        ),
        channels=1,
        class_names=("normal", "pneumonia"),
        # The bundled copy has the official splits and class counts but another train row
        # order, hence its own digest.
        bundled=Checksum(
            "sha256", "8c555c787c4594882835129e3cee6a02cf9b8a6d8aed162b512521a5697177c8"
        ),
    ),
    # The 28x28 single-label 2D sets of MedMNIST v2 (record 6496656, MD5 from medmnist/info.py).
    "breastmnist": _v2(
        "breastmnist", "750601b1f35ba3300ea97c75c52ff8f6", 1, ("malignant", "normal, benign")
    ),
    "octmnist": _v2(
        "octmnist", "c68d92d5b585d8d81f7112f81e2d0842", 1,
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    ),
    "dermamnist": _v2(
        "dermamnist", "0744692d530f8e62ec473284d019b0c7", 3,
        (
            "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
            "benign keratosis-like lesions", "dermatofibroma", "melanoma",
            "melanocytic nevi", "vascular lesions",
        ),
    ),
    "bloodmnist": _v2(
        "bloodmnist", "7053d0359d879ad8a5505303e11de1dc", 3,
        (
            "basophil", "eosinophil", "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte", "monocyte", "neutrophil", "platelet",
        ),
    ),
    "pathmnist": _v2(
        "pathmnist", "a8b06965200029087d5bd730944a56c1", 3,
        (
            "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
            "normal colon mucosa", "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
    ),
    "organamnist": _v2("organamnist", "866b832ed4eeba67bfb9edee1d5544e6", 1, _ORGANS),
    "organcmnist": _v2("organcmnist", "0afa5834fb105f7705a7d93372119a21", 1, _ORGANS),
    "organsmnist": _v2("organsmnist", "e5c39f1af030238290b9557d9503af9d", 1, _ORGANS),
}  # fmt: skip
"""Known MedMNIST files. ChestMNIST (multi-label) is absent on purpose: not single-label."""


def default_data_dir() -> Path:
    """`$FEDMQ_DATA_DIR`, else `~/.medmnist` (where the official medmnist tools put files)."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".medmnist"


def medmnist_path(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The path `<data_dir>/<name>.npz` the loader reads (and downloads to)."""
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"invalid MedMNIST dataset name {name!r}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return root / f"{name}.npz"


def load_medmnist(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    url: str | None = None,
) -> ImageDataset:
    """Load one split of a MedMNIST `.npz` as an `ImageDataset`.

    The file is `<data_dir>/<name>.npz`; when absent and `download` is true it is fetched
    from `url` (default: the registry's) and verified against the registry checksum.
    Raises `DatasetNotFound` (naming the path and URL), `ChecksumMismatch`, or
    `InvalidDatasetFile`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = ensure_medmnist_file(name, data_dir=data_dir, download=download, url=url)
    info = MEDMNIST_FILES.get(name)
    images, labels, num_classes = read_medmnist_split(path, split)
    if info is not None and info.num_classes >= num_classes:
        return ImageDataset(images, labels, class_names=info.class_names)
    return ImageDataset(images, labels, num_classes=num_classes)


def ensure_medmnist_file(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    url: str | None = None,
) -> Path:
    """Path of `<name>.npz`, looked up in order (see the module docstring).

    A placed file wins; then the bundled copy (checksum-verified, announced in one log
    line); then a download into the first candidate directory when `download` allows.
    """
    candidates = candidate_paths(name, data_dir)
    for path in candidates:
        if path.is_file():
            return path
    info = MEDMNIST_FILES.get(name)
    bundled = bundled_path(name)
    if bundled is not None:
        if bundled not in _announced:
            _announced.add(bundled)
            log.info("no placed copy found: using the bundled dataset", dataset=name)
        return bundled
    target = candidates[0]
    source = url or (info.url if info is not None else None)
    if not download or info is None or source is None:
        reason = (
            "downloading is disabled"
            if not download
            else f"{name!r} has no published checksum to verify a download against"
        )
        raise DatasetNotFound(_place_it_message(name, target, source, reason))
    try:
        return download_file(source, target, checksum=info.checksum)
    except (DownloadFailed, OSError) as error:  # OSError: data_dir not creatable/writable
        raise DatasetNotFound(_place_it_message(name, target, source, str(error))) from error


def candidate_paths(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where a placed `<name>.npz` is looked for: the explicit directory, then `~/.medmnist`."""
    paths = [medmnist_path(name, data_dir), Path.home() / ".medmnist" / f"{name}.npz"]
    return list(dict.fromkeys(paths))


def bundled_path(name: str) -> Path | None:
    """The copy of `<name>.npz` shipped with fedmq, verified, or None when none ships.

    Raises `ChecksumMismatch` when the shipped file was altered or truncated: a damaged
    installation must not train silently on other data.
    """
    info = MEDMNIST_FILES.get(name)
    path = BUNDLED_DIR / f"{name}.npz"
    if info is None or info.bundled is None or not path.is_file():
        return None
    _verify_bundled(path, info.bundled)
    return path


_announced: set[Path] = set()
"""Bundled files already named in a log line by this process (one line, not one per split)."""
_verified: set[Path] = set()


def _verify_bundled(path: Path, checksum: Checksum) -> None:
    if path in _verified:
        return
    digest = hashlib.new(checksum.algorithm, path.read_bytes()).hexdigest()
    if digest != checksum.hexdigest:
        raise ChecksumMismatch(
            f"the bundled {path.name} is damaged ({checksum.algorithm} {digest[:12]}..., "
            f"expected {checksum.hexdigest[:12]}...): reinstall fedmq, or place a copy in "
            f"~/.medmnist or the directory named by {DATA_DIR_ENV} / --data-dir"
        )
    _verified.add(path)


def download_file(
    url: str, dest: Path, *, checksum: Checksum, timeout: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """Fetch `url` to `dest` atomically: temp file, verify `checksum`, rename.

    Nothing is left at `dest` (or beside it) unless the digest matched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            digest = _stream(url, sink, checksum.algorithm, timeout)
        if digest != checksum.hexdigest.lower():
            raise ChecksumMismatch(
                f"{url} downloaded with {checksum.algorithm} {digest}, expected "
                f"{checksum.hexdigest}; nothing was saved. Place a trusted copy at {dest}."
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _stream(url: str, sink: BinaryIO, algorithm: str, timeout: float) -> str:
    hasher = hashlib.new(algorithm)
    request = urllib.request.Request(url, headers={"User-Agent": "fedmq"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                hasher.update(chunk)
                sink.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DownloadFailed(f"downloading {url} failed: {error}") from error
    return hasher.hexdigest()


def _place_it_message(name: str, path: Path, url: str | None, reason: str) -> str:
    where = f" Download it from {url} and place it at {path}" if url else f" Place it at {path}"
    return (
        f"MedMNIST file for {name!r} not found at {path} ({reason}).{where} "
        f"(or point {DATA_DIR_ENV} / --data-dir at the directory that holds {path.name})."
    )


def read_medmnist_split(
    path: Path, split: str
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], int]:
    """Images, labels and the class count (over all splits) of one split, layout-checked."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            _require_keys(path, keys, split)
            images = archive[f"{split}_images"]
            labels: dict[str, npt.NDArray[np.generic]] = {
                s: archive[f"{s}_labels"] for s in SPLITS if f"{s}_labels" in keys
            }
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise InvalidDatasetFile(f"{path} is not a readable .npz archive: {error}") from error
    _check_images(path, split, images)
    if len(labels[split]) != len(images):
        raise InvalidDatasetFile(
            f"{path}: {len(images)} {split} images but {len(labels[split])} labels"
        )
    vectors = {s: _label_vector(path, s, y) for s, y in labels.items()}
    num_classes = 1 + max(int(v.max(initial=0)) for v in vectors.values())
    return images, vectors[split], num_classes


def _require_keys(path: Path, keys: set[str], split: str) -> None:
    missing = sorted({f"{split}_images", f"{split}_labels"} - keys)
    if missing:
        raise InvalidDatasetFile(
            f"{path} lacks {', '.join(missing)}; a MedMNIST file has "
            f"train_/val_/test_ images and labels, this one has {sorted(keys)}"
        )


def _check_images(path: Path, split: str, images: npt.NDArray[np.generic]) -> None:
    if images.dtype != np.uint8:
        raise InvalidDatasetFile(f"{path}: {split}_images must be uint8, got {images.dtype}")
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if not (images.ndim == 3 or rgb) or images.shape[1] != images.shape[2]:
        raise InvalidDatasetFile(
            f"{path}: {split}_images must be (N, S, S) or (N, S, S, 3), got {images.shape}"
        )


def _label_vector(path: Path, split: str, labels: npt.NDArray[np.generic]) -> npt.NDArray[np.int64]:
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidDatasetFile(f"{path}: {split}_labels must be integers, got {labels.dtype}")
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise InvalidDatasetFile(
            f"{path}: {split}_labels must be (N, 1) single-label class indices, got "
            f"{labels.shape} (multi-label files such as ChestMNIST are not supported)"
        )
    if labels.size and labels.min() < 0:
        raise InvalidDatasetFile(f"{path}: {split}_labels has negative class indices")
    return labels.reshape(-1).astype(np.int64)
