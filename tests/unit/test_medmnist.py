"""MedMNIST files: loading, layout checks, checksum-verified download, site datasets."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.data import (
    ChecksumMismatch,
    DatasetNotFound,
    ImageDataset,
    InvalidDatasetFile,
    default_data_dir,
    load_dataset,
    load_medmnist,
    load_site_dataset,
    partition,
)
from services.common.data import dataset as dataset_module
from services.common.data import medmnist as medmnist_module
from services.common.data.medmnist import (
    MEDMNIST_FILES,
    Checksum,
    MedMnistFile,
    bundled_path,
    ensure_medmnist_file,
)
from tests.datagen import (
    make_medmnist_arrays,
    real_pneumonia_path,
    save_npz,
    write_medmnist_npz,
)


@pytest.fixture(autouse=True)
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME without `~/.medmnist` and no FEDMQ_DATA_DIR, whatever this machine holds."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FEDMQ_DATA_DIR", raising=False)
    return home


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_medmnist_npz(tmp_path / "genmnist.npz", sizes=(60, 20, 30))
    return tmp_path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a directory: (base URL, directory)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/tinymnist.npz"


def _register(monkeypatch: pytest.MonkeyPatch, name: str, sha256: str) -> None:
    entry = MedMnistFile("http://invalid.example/", Checksum("sha256", sha256), 1, ("a", "b"))
    monkeypatch.setitem(MEDMNIST_FILES, name, entry)


def test_generated_file_loads_every_split_with_its_sizes_and_labels(data_dir: Path) -> None:
    # Given a generated file in MedMNIST layout
    arrays = np.load(data_dir / "genmnist.npz")
    for split, size in (("train", 60), ("val", 20), ("test", 30)):
        # When one split is loaded
        dataset = load_medmnist("genmnist", split, data_dir=data_dir, download=False)
        # Then its images and labels are those of the file
        assert len(dataset) == size
        assert np.array_equal(dataset.labels, arrays[f"{split}_labels"][:, 0])
        assert torch.equal(dataset.pixels[:, 0], torch.from_numpy(arrays[f"{split}_images"]))
    assert dataset.num_classes == 2


def test_items_are_float_images_normalised_to_minus_one_one(data_dir: Path) -> None:
    dataset = load_medmnist("genmnist", "test", data_dir=data_dir, download=False)
    raw = np.load(data_dir / "genmnist.npz")["test_images"][3].astype(np.float32)

    image, label = dataset[3]

    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert torch.allclose(image[0], torch.from_numpy(raw / 127.5 - 1.0), atol=1e-6)
    assert label == int(dataset.labels[3])


def test_items_are_equal_whether_the_float_cache_is_used_or_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    cached = ImageDataset(images, np.array([0, 1, 0, 1, 1]))
    monkeypatch.setattr(dataset_module, "FLOAT_CACHE_LIMIT_BYTES", 0)
    uncached = ImageDataset(images, np.array([0, 1, 0, 1, 1]))

    assert uncached._normalised is None and cached._normalised is not None
    assert all(torch.equal(cached[i][0], uncached[i][0]) for i in range(5))


def test_grey_images_become_three_channels_and_are_resized_when_asked() -> None:
    images = np.full((4, 28, 28), 255, dtype=np.uint8)
    images[:, :14] = 0  # top half black

    dataset = ImageDataset(images, np.zeros(4, dtype=np.int64), channels=3, size=56)

    image, _ = dataset[0]
    assert image.shape == (3, 56, 56)
    assert torch.equal(image[0], image[2])
    assert image[0, 0, 0].item() == -1.0 and image[0, -1, -1].item() == 1.0


def test_rgb_images_become_grey_by_luma() -> None:
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[..., 1] = 200  # pure green

    dataset = ImageDataset(images, np.array([0, 1]), channels=1)

    assert dataset.pixels.shape == (2, 1, 4, 4)
    assert int(dataset.pixels[0, 0, 0, 0]) == round(0.587 * 200)


def test_subset_keeps_classes_and_counts_only_the_chosen_examples() -> None:
    images = np.zeros((6, 8, 8), dtype=np.uint8)
    images[:, 0, 0] = np.arange(6)
    dataset = ImageDataset(images, np.array([0, 1, 1, 2, 2, 2]), class_names=("a", "b", "c"))

    part = dataset.subset([5, 1])

    assert part.class_names == ("a", "b", "c") and part.num_classes == 3
    assert part.labels.tolist() == [2, 1]
    assert part.class_counts().tolist() == [0, 1, 1]
    assert int(part.pixels[0, 0, 0, 0]) == 5


def test_real_pneumoniamnist_has_official_split_sizes_and_class_counts() -> None:
    real = real_pneumonia_path()
    assert real is not None, "the package ships pneumoniamnist.npz"
    counts = {}
    for split in ("train", "val", "test"):
        dataset = load_medmnist("pneumoniamnist", split, download=False)
        counts[split] = dataset.class_counts().tolist()
    assert counts == {"train": [1214, 3494], "val": [135, 389], "test": [234, 390]}
    assert dataset.class_names == ("normal", "pneumonia")
    assert dataset.image_size == (28, 28) and dataset.channels == 1


def test_a_placed_file_is_used_even_though_its_checksum_is_not_the_official_one(
    tmp_path: Path,
) -> None:
    write_medmnist_npz(tmp_path / "pneumoniamnist.npz", sizes=(10, 4, 6))

    dataset = load_medmnist("pneumoniamnist", "val", data_dir=tmp_path, url=_closed_port_url())

    assert len(dataset) == 4
    assert dataset.class_names == ("normal", "pneumonia")


def test_download_with_matching_checksum_saves_the_file_and_loads_it(
    tmp_path: Path, http_root: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a server offering a file whose sha256 the registry knows
    base_url, served = http_root
    source = write_medmnist_npz(served / "tinymnist.npz", sizes=(12, 4, 4))
    _register(monkeypatch, "tinymnist", hashlib.sha256(source.read_bytes()).hexdigest())
    cache = tmp_path / "cache"

    # When it is loaded from an empty data directory
    dataset = load_medmnist("tinymnist", "train", data_dir=cache, url=f"{base_url}/tinymnist.npz")

    # Then it was downloaded byte for byte, with no temp file left beside it
    assert len(dataset) == 12
    assert (cache / "tinymnist.npz").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["tinymnist.npz"]


def test_download_with_wrong_checksum_raises_and_leaves_no_file(
    tmp_path: Path, http_root: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, served = http_root
    write_medmnist_npz(served / "tinymnist.npz", sizes=(12, 4, 4))
    _register(monkeypatch, "tinymnist", "0" * 64)
    cache = tmp_path / "cache"

    with pytest.raises(ChecksumMismatch, match="expected 0000"):
        load_medmnist("tinymnist", "train", data_dir=cache, url=f"{base_url}/tinymnist.npz")

    assert list(cache.iterdir()) == []


def test_http_error_is_reported_as_not_found_naming_path_and_url(
    tmp_path: Path, http_root: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = http_root
    _register(monkeypatch, "tinymnist", "0" * 64)
    url = f"{base_url}/absent.npz"
    cache = tmp_path / "cache"

    with pytest.raises(DatasetNotFound) as caught:
        load_medmnist("tinymnist", "train", data_dir=cache, url=url)

    assert str(cache / "tinymnist.npz") in str(caught.value) and url in str(caught.value)
    assert list(cache.iterdir()) == []


def test_missing_file_without_network_names_the_exact_path_and_url(tmp_path: Path) -> None:
    url = _closed_port_url()

    with pytest.raises(DatasetNotFound) as caught:
        load_medmnist("breastmnist", "train", data_dir=tmp_path / "nowhere", url=url)

    message = str(caught.value)
    assert f"place it at {tmp_path / 'nowhere' / 'breastmnist.npz'}" in message
    assert url in message


def test_missing_file_with_download_disabled_names_the_path_and_official_url(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()

    with pytest.raises(DatasetNotFound) as caught:
        load_medmnist("breastmnist", "test", data_dir=data_dir, download=False)

    assert str(data_dir / "breastmnist.npz") in str(caught.value)
    assert MEDMNIST_FILES["breastmnist"].url in str(caught.value)
    assert list(data_dir.iterdir()) == []


def test_pneumoniamnist_without_a_placed_copy_comes_from_the_bundle_without_download(
    tmp_path: Path,
) -> None:
    # Given no placed file anywhere and a download URL that cannot answer
    url = _closed_port_url()

    # When the file is looked up
    path = ensure_medmnist_file("pneumoniamnist", data_dir=tmp_path / "empty", url=url)

    # Then the bundled copy is used and nothing was written to the data directory
    assert path == bundled_path("pneumoniamnist")
    assert not (tmp_path / "empty").exists()


def test_a_placed_copy_wins_over_home_and_home_wins_over_the_bundle(
    tmp_path: Path, empty_home: Path
) -> None:
    # Given a copy in ~/.medmnist and another in an explicit directory
    home_copy = write_medmnist_npz(empty_home / ".medmnist" / "pneumoniamnist.npz", sizes=(8, 2, 2))
    explicit = write_medmnist_npz(tmp_path / "mine" / "pneumoniamnist.npz", sizes=(8, 2, 2))

    # Then the explicit directory comes first, then ~/.medmnist when the explicit one lacks it
    assert ensure_medmnist_file("pneumoniamnist", data_dir=explicit.parent) == explicit
    assert ensure_medmnist_file("pneumoniamnist", data_dir=tmp_path / "empty") == home_copy
    assert ensure_medmnist_file("pneumoniamnist") == home_copy


def test_a_damaged_bundled_copy_is_refused_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a bundled file truncated by a broken installation
    real = bundled_path("pneumoniamnist")
    assert real is not None
    damaged_dir = tmp_path / "bundled"
    damaged_dir.mkdir()
    (damaged_dir / "pneumoniamnist.npz").write_bytes(real.read_bytes()[:100_000])
    monkeypatch.setattr(medmnist_module, "BUNDLED_DIR", damaged_dir)

    # When it is looked up, Then the error says what is wrong and what to do, on one line
    with pytest.raises(ChecksumMismatch) as caught:
        load_medmnist("pneumoniamnist", "test", data_dir=tmp_path / "empty")
    message = str(caught.value)
    assert "\n" not in message
    assert "bundled pneumoniamnist.npz is damaged" in message and "reinstall fedmq" in message


def test_file_without_a_split_is_rejected_naming_the_missing_key(tmp_path: Path) -> None:
    arrays = make_medmnist_arrays(sizes=(10, 4, 4))
    del arrays["val_labels"]
    save_npz(tmp_path / "brokenmnist.npz", arrays)

    with pytest.raises(InvalidDatasetFile, match="val_labels"):
        load_medmnist("brokenmnist", "val", data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("train_images", np.zeros((10, 28, 28), dtype=np.float32), "uint8"),
        ("train_images", np.zeros((10, 28, 20), dtype=np.uint8), "(N, S, S)"),
        ("train_labels", np.zeros((10, 14), dtype=np.uint8), "multi-label"),
        ("train_labels", np.zeros((9, 1), dtype=np.uint8), "10 train images but 9 labels"),
    ],
)
def test_malformed_arrays_are_rejected_with_a_clear_reason(
    tmp_path: Path, key: str, value: np.ndarray, complaint: str
) -> None:
    arrays = make_medmnist_arrays(sizes=(10, 4, 4))
    arrays[key] = value
    save_npz(tmp_path / "badmnist.npz", arrays)

    with pytest.raises(InvalidDatasetFile) as caught:
        load_medmnist("badmnist", "train", data_dir=tmp_path, download=False)

    assert complaint in str(caught.value)


def test_a_file_that_is_not_an_npz_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "junkmnist.npz").write_bytes(b"not a zip archive")

    with pytest.raises(InvalidDatasetFile, match="not a readable"):
        load_medmnist("junkmnist", "train", data_dir=tmp_path, download=False)


def test_default_data_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("FEDMQ_DATA_DIR")
    assert default_data_dir() == Path.home() / ".medmnist"


def test_site_datasets_partition_the_train_split_disjointly(data_dir: Path) -> None:
    # Given three sites of one Dirichlet partition
    full = load_dataset("medmnist:genmnist", split="train", data_dir=data_dir, download=False)
    load = functools.partial(
        load_site_dataset, "medmnist:genmnist", data_dir=data_dir, num_sites=3,
        scheme="dirichlet", alpha=1.0, seed=7, min_size=5, download=False,
    )  # fmt: skip

    # When each site loads its part
    sites = [load(site=s) for s in range(3)]

    # Then the parts are exactly the partition's, and together they are the whole split
    parts = partition(full.labels, scheme="dirichlet", num_sites=3, seed=7, alpha=1.0, min_size=5)
    for site, part in zip(sites, parts, strict=True):
        assert np.array_equal(site.labels, full.labels[part])
        assert torch.equal(site.pixels, full.pixels[torch.from_numpy(part)])
    assert sum(len(s) for s in sites) == len(full)


def test_site_datasets_leave_held_out_splits_whole_and_convert_them(data_dir: Path) -> None:
    test_split = load_site_dataset(
        "medmnist:genmnist", split="test", data_dir=data_dir, site=1, num_sites=3,
        channels=3, size=32, download=False,
    )  # fmt: skip

    assert len(test_split) == 30
    assert test_split[0][0].shape == (3, 32, 32)


def test_unknown_source_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="medmnist:<name> or folder:<path>"):
        load_site_dataset("s3://bucket/data")


def test_a_site_outside_the_partition_is_rejected(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"site must be in \[0, 2\)"):
        load_site_dataset(
            "medmnist:genmnist", data_dir=data_dir, site=2, num_sites=2, download=False
        )
