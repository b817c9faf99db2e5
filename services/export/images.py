"""Reading image files for prediction: PNG/JPEG with PIL, DICOM with pydicom, as a viewer would.

Every reader returns an 8-bit display image (`(H, W)` grey or `(H, W, 3)` RGB) plus notes
on what was done to it that a user should know (a conversion, an automatic window), or
raises `UnusableImage` with a sentence saying why the file cannot be classified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
DICOM_PREAMBLE = 128
"""A DICOM Part 10 file has a 128-byte preamble, then `DICM`."""
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class UnusableImage(ValueError):
    """A file that cannot be classified; the message says why, in one sentence."""


@dataclass(frozen=True)
class DisplayImage:
    """An 8-bit image as a viewer would show it, and what was done to get it."""

    pixels: npt.NDArray[np.uint8]
    notes: tuple[str, ...] = field(default=())

    @property
    def channels(self) -> int:
        """1 for greyscale, 3 for RGB."""
        return 1 if self.pixels.ndim == 2 else 3


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the `DICM` marker of a Part 10 file without one."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as stream:
            head = stream.read(DICOM_PREAMBLE + 4)
    except OSError:
        return False
    return head[DICOM_PREAMBLE:] == b"DICM"


def read_image(path: Path, *, modalities: list[str] | None = None) -> DisplayImage:
    """The display image of a PNG, JPEG or DICOM file."""
    if is_dicom(path):
        return read_dicom(path, modalities=modalities)
    return read_picture(path)


def read_picture(path: Path) -> DisplayImage:
    """PNG/JPEG (anything PIL decodes) as 8-bit grey or RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return _picture_pixels(image)
    except UnidentifiedImageError as error:
        raise UnusableImage("not an image PIL can read (PNG, JPEG) nor a DICOM file") from error
    except Image.DecompressionBombError as error:
        raise UnusableImage(f"refused as a decompression bomb: {error}") from error
    except OSError as error:
        raise UnusableImage(f"cannot decode the image: {error}") from error


def _picture_pixels(image: Any) -> DisplayImage:
    mode = image.mode
    if mode == "L":
        return DisplayImage(np.asarray(image, dtype=np.uint8))
    if mode == "RGB":
        return DisplayImage(np.asarray(image, dtype=np.uint8))
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image).astype(np.float64)
        pixels, note = _auto_window(values)
        return DisplayImage(pixels, (f"{mode} image: {note}",))
    if mode in ("1", "LA", "La"):
        return DisplayImage(
            np.asarray(image.convert("L"), dtype=np.uint8), (f"mode {mode} read as grey",)
        )
    return DisplayImage(
        np.asarray(image.convert("RGB"), dtype=np.uint8), (f"mode {mode} converted to RGB",)
    )


def read_dicom(path: Path, *, modalities: list[str] | None = None) -> DisplayImage:
    """A DICOM image after its modality LUT, VOI LUT/window and photometric interpretation."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise UnusableImage(f"not a readable DICOM file: {error}") from error
    _check_dicom(ds, modalities)
    try:
        stored = ds.pixel_array
    except Exception as error:  # pydicom raises many types for undecodable pixel data
        raise UnusableImage(f"the DICOM pixel data cannot be decoded: {error}") from error
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in MONOCHROME:
        return _monochrome(stored, ds, photometric)
    return _colour(stored, ds, photometric)


def _check_dicom(ds: Any, modalities: list[str] | None) -> None:
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = ds.get("SOPClassUID", None)
        what = f" ({kind.name})" if kind is not None and hasattr(kind, "name") else ""
        raise UnusableImage(f"the DICOM file holds no pixel data{what}")
    modality = str(ds.get("Modality", "")).upper()
    if modalities and modality and modality not in modalities:
        raise UnusableImage(
            f"DICOM modality {modality}, but the model is for {', '.join(modalities)} images"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnusableImage(f"a multi-frame DICOM ({frames} frames): export single frames")


def _monochrome(stored: npt.NDArray[Any], ds: Any, photometric: str) -> DisplayImage:
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    notes: list[str] = []
    if _has_voi(ds):
        low, high = _voi_output_range(ds)
        windowed = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        pixels = _to_uint8(windowed, low, high)
    elif int(ds.get("BitsStored", 8)) <= 8 and not _rescaled(ds):
        pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8)  # already display values
    else:
        pixels, note = _auto_window(values)
        notes.append(note)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels  # MONOCHROME1: the lowest value is shown white
    return DisplayImage(pixels, tuple(notes))


def _colour(stored: npt.NDArray[Any], ds: Any, photometric: str) -> DisplayImage:
    from pydicom.pixels.processing import convert_color_space

    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise UnusableImage(f"photometric interpretation {photometric or 'absent'} not supported")
    if photometric.startswith("YBR"):
        stored = convert_color_space(stored, photometric, "RGB")
    elif photometric != "RGB":
        raise UnusableImage(f"photometric interpretation {photometric} is not supported")
    bits = int(ds.get("BitsStored", 8))
    pixels = stored if bits <= 8 else _to_uint8(stored.astype(np.float64), 0, 2**bits - 1)
    return DisplayImage(np.asarray(pixels, dtype=np.uint8))


def _has_voi(ds: Any) -> bool:
    lut = ds.get("VOILUTSequence")
    window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    return bool(lut) or window


def _rescaled(ds: Any) -> bool:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (
        bool(ds.get("ModalityLUTSequence"))
        or (slope is not None and float(slope) != 1.0)
        or (intercept is not None and float(intercept) != 0.0)
    )


def _voi_output_range(ds: Any) -> tuple[float, float]:
    """The range `apply_voi_lut` maps into (PS3.3 C.11.2): the LUT's, else the window's."""
    lut = ds.get("VOILUTSequence")
    if lut:
        bits = int(lut[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    # pydicom's windowing maps onto the stored range laid through the modality rescale.
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        low, high = 0.0, float(2**bits - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None and not ds.get("ModalityLUTSequence"):
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _auto_window(values: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.uint8], str]:
    low, high = float(values.min()), float(values.max())
    return _to_uint8(
        values, low, high
    ), f"no window in the file: shown over its range {low:g}..{high:g}"


def _to_uint8(values: npt.NDArray[np.float64], low: float, high: float) -> npt.NDArray[np.uint8]:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
