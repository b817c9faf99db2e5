"""Image files read for prediction: PNG/JPEG by PIL, DICOM through its display pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.data import ImageDataset
from services.common.data.preprocessing import Preprocessing
from services.export.images import UnusableImage, read_image
from tests.support.dicom_files import VARIANTS, write_dicom


@pytest.fixture
def pixels() -> np.ndarray:
    image = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    image[0, :2] = (0, 255)  # the extremes, where windowing and inversion err first
    return image


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_dicom_variant_shows_the_pixels_it_was_made_from(
    tmp_path: Path, pixels: np.ndarray, variant: str
) -> None:
    # Given the same display image stored as 8/16-bit, rescaled, MONOCHROME1/2
    path = write_dicom(tmp_path / "x.dcm", pixels, variant)  # type: ignore[arg-type]
    # When it is read as a viewer would
    image = read_image(path, modalities=["CR", "DX"])
    # Then the display pixels are exactly the original ones, with nothing to note
    assert np.array_equal(image.pixels, pixels) and image.notes == ()


def test_a_16_bit_dicom_without_a_window_is_shown_over_its_range_and_says_so(
    tmp_path: Path, pixels: np.ndarray
) -> None:
    path = write_dicom(tmp_path / "x.dcm", pixels, "16bit-rescaled-mono2")
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(path)
    image = read_image(path)
    # The rescaled values are the pixels themselves, spanning 0..255: unchanged
    assert np.array_equal(image.pixels, pixels)
    assert image.notes == ("no window in the file: shown over its range 0..255",)


def test_a_dicom_of_another_modality_or_without_pixels_is_refused(
    tmp_path: Path, pixels: np.ndarray
) -> None:
    mr = write_dicom(tmp_path / "mr.dcm", pixels, "8bit-mono2", modality="MR")
    empty = write_dicom(tmp_path / "sr.dcm", pixels, "8bit-mono2", with_pixels=False)
    with pytest.raises(UnusableImage, match="modality MR, but the model is for CR, DX"):
        read_image(mr, modalities=["CR", "DX"])
    assert read_image(mr).pixels.shape == (28, 28)  # a model for any modality reads it
    with pytest.raises(UnusableImage, match="holds no pixel data"):
        read_image(empty)


def test_a_16_bit_png_is_windowed_over_its_range_and_a_text_file_is_refused(
    tmp_path: Path, pixels: np.ndarray
) -> None:
    deep = (pixels.astype(np.uint16) * 256 + 7).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.pixels.dtype == np.uint8 and np.array_equal(image.pixels, pixels)
    assert "shown over its range" in image.notes[0]
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(UnusableImage, match="not an image PIL can read"):
        read_image(tmp_path / "notes.png")


def test_preprocessing_equals_the_training_datasets_conversion_for_any_size_and_channels(
    pixels: np.ndarray,
) -> None:
    # Given an RGB 40 x 40 image and a 1-channel 28 x 28 model trained on MedMNIST files
    rgb = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    preprocessing = Preprocessing.for_source("medmnist:x", channels=1, size=28)
    # When predict preprocesses it
    item = preprocessing.dataset([rgb])[0][0]
    # Then it is what the training data source makes of the same image
    trained = ImageDataset(rgb[None], [0], channels=1, size=28)[0][0]
    assert np.array_equal(item.numpy(), trained.numpy())
    assert Preprocessing.from_description(preprocessing.describe()) == preprocessing


@pytest.mark.slow  # imports torchvision (its ImageFolder), seconds on a busy machine
def test_folder_models_preprocess_new_images_as_image_folders_decode_training_images(
    tmp_path: Path,
) -> None:
    from services.common.data import load_image_folder

    rgb = np.random.default_rng(3).integers(0, 256, (50, 36, 3), dtype=np.uint8)
    (tmp_path / "cls").mkdir()
    Image.fromarray(rgb).save(tmp_path / "cls" / "a.png")
    trained = load_image_folder(tmp_path, channels=1, size=28)[0][0]
    preprocessing = Preprocessing.for_source(f"folder:{tmp_path}", channels=1, size=28)
    assert preprocessing.pipeline == "pil"
    assert np.array_equal(preprocessing.dataset([rgb])[0][0].numpy(), trained.numpy())
