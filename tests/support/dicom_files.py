"""DICOM files made from real 8-bit pixels, as X-ray departments store them.

Each variant encodes the same display image differently (stored values, rescale, window,
photometric interpretation); a viewer, and `fedmq predict`, must show them all as the
original pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

Variant = Literal["8bit-mono2", "8bit-mono1", "16bit-rescaled-mono2", "16bit-rescaled-mono1"]
VARIANTS: tuple[Variant, ...] = (
    "8bit-mono2",
    "8bit-mono1",
    "16bit-rescaled-mono2",
    "16bit-rescaled-mono1",
)

RESCALE_SLOPE = 0.0625
"""Stored = pixel / slope + offset: 16 stored steps per display level (binary-exact)."""
STORED_OFFSET = 1000
"""A detector pedestal removed by the rescale intercept."""


def write_dicom(
    path: Path,
    pixels: npt.NDArray[np.uint8],
    variant: Variant,
    *,
    modality: str = "DX",
    with_pixels: bool = True,
) -> Path:
    """Write `pixels` (`(H, W)` uint8) as a single-frame DICOM file of `variant`."""
    ds = _base_dataset(modality)
    monochrome1 = variant.endswith("mono1")
    display = (255 - pixels) if monochrome1 else pixels
    photometric = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    if variant.startswith("8bit"):
        ds.set_pixel_data(np.ascontiguousarray(display), photometric, 8)
    else:
        stored = display.astype(np.uint16) * 16 + STORED_OFFSET
        ds.set_pixel_data(np.ascontiguousarray(stored), photometric, 16)
        ds.RescaleSlope = f"{RESCALE_SLOPE}"
        ds.RescaleIntercept = f"{-STORED_OFFSET * RESCALE_SLOPE}"
        ds.RescaleType = "US"
        # The window a department would set: the display range 0..255 of the rescaled values.
        ds.WindowCenter = "128"
        ds.WindowWidth = "256"
    if not with_pixels:
        del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def _base_dataset(modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "anonymous"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds
