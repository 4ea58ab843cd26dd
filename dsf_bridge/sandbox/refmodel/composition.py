"""Tissue composition by Hounsfield units: the reference model's whole computation (DESIGN 5a).

The ranges are those of UME's Body-and-Organ-Analysis: the body is every voxel above -500 HU,
reduced to its largest connected component with holes filled; inside the body, bone is
HU >= 300, skeletal muscle -29..150, adipose tissue -190..-30 and air below -400 (all bounds
inclusive). Areas are reported per slice in cm², volumes over the series in mL, and the mean HU
of each tissue over all its voxels.

This file depends on numpy and scipy only, never on the rest of dsf-bridge: the MLServer model
(``tissue_model.py`` beside it) runs in MLServer's own virtual environment and loads this very
file by path, so the tests and the inference server compute with the same source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = [
    "BODY_THRESHOLD_HU",
    "LABELS",
    "TISSUES",
    "Composition",
    "body_mask",
    "tissue_composition",
    "tissue_labels",
]

BODY_THRESHOLD_HU = -500.0

# Output order of every per-tissue array. "body" is the whole body mask, the others lie inside it.
TISSUES: tuple[str, ...] = ("body", "bone", "muscle", "adipose", "air")


# Values of the label map (tissue_labels): the tissue ranges do not overlap, so one label each.
LABELS: dict[str, int] = {"outside": 0, "body": 1, "bone": 2, "muscle": 3, "adipose": 4, "air": 5}

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Composition:
    """Per-tissue measurements, each array in :data:`TISSUES` order.

    ``area_cm2`` has shape (slices, tissues); ``volume_ml`` and ``mean_hu`` have shape
    (tissues,). ``mean_hu`` is NaN for a tissue with no voxel.
    """

    area_cm2: FloatArray
    volume_ml: FloatArray
    mean_hu: FloatArray
    voxel_count: npt.NDArray[np.int64]

    def named_outputs(self) -> list[tuple[str, FloatArray]]:
        """The model's output tensors by name, in the order both servers answer them."""
        outputs: list[tuple[str, FloatArray]] = []
        for column, tissue in enumerate(TISSUES):
            outputs.append((f"{tissue}_area_cm2", self.area_cm2[:, column]))
            outputs.append((f"{tissue}_volume_ml", self.volume_ml[column : column + 1]))
            outputs.append((f"{tissue}_mean_hu", self.mean_hu[column : column + 1]))
        return outputs


def body_mask(hu_slice: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """The body of one axial slice: HU > -500, largest connected component, holes filled.

    Slices are treated in 2D with 4-connectivity: CT series are often sparse along z (5 mm
    apart), and per-slice masks keep a slice's area independent of its neighbours.
    """
    candidate = np.asarray(hu_slice) > BODY_THRESHOLD_HU
    labels, count = ndimage.label(candidate)
    if count == 0:
        return np.zeros(candidate.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    largest = labels == int(sizes.argmax())
    filled: npt.NDArray[np.bool_] = ndimage.binary_fill_holes(largest)
    return filled


def tissue_composition(
    hu: npt.ArrayLike, spacing_mm: tuple[float, float, float] | npt.ArrayLike
) -> Composition:
    """Measure the tissues of a CT volume given in HU.

    ``hu`` has shape (slices, rows, columns) or (rows, columns) for one slice. ``spacing_mm``
    is (slice spacing, row spacing, column spacing) in millimetres; for one slice the first value
    is its thickness, used for the volume.
    """
    volume = np.asarray(hu, dtype=np.float64)
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"expected HU of shape (slices, rows, columns), got {volume.shape}")
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError("spacing_mm must be three positive numbers (slice, row, column)")

    pixel_cm2 = spacing[1] * spacing[2] / 100.0
    slice_cm = spacing[0] / 10.0
    n_slices = volume.shape[0]
    area = np.zeros((n_slices, len(TISSUES)), dtype=np.float64)
    hu_sum = np.zeros(len(TISSUES), dtype=np.float64)
    counts = np.zeros(len(TISSUES), dtype=np.int64)
    for index in range(n_slices):
        hu_slice = volume[index]
        body = body_mask(hu_slice)
        for column, tissue in enumerate(TISSUES):
            mask = body if tissue == "body" else body & _tissue_range(hu_slice, tissue)
            voxels = int(mask.sum())
            area[index, column] = voxels * pixel_cm2
            counts[column] += voxels
            hu_sum[column] += float(hu_slice[mask].sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, hu_sum / np.maximum(counts, 1), np.nan)
    return Composition(
        area_cm2=area,
        volume_ml=area.sum(axis=0) * slice_cm,  # cm² x cm = cm³ = mL
        mean_hu=mean,
        voxel_count=counts,
    )


def tissue_labels(hu: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """A label map of the volume (see :data:`LABELS`): 0 outside the body, 1 body tissue in no
    range, then bone, muscle, adipose, air. Same masks as :func:`tissue_composition`."""
    volume = np.asarray(hu, dtype=np.float64)
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"expected HU of shape (slices, rows, columns), got {volume.shape}")
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for index in range(volume.shape[0]):
        hu_slice = volume[index]
        body = body_mask(hu_slice)
        labels[index][body] = LABELS["body"]
        for tissue in TISSUES[1:]:
            labels[index][body & _tissue_range(hu_slice, tissue)] = LABELS[tissue]
    return labels


def _tissue_range(hu: FloatArray, tissue: str) -> npt.NDArray[np.bool_]:
    """Voxels whose HU lies in the tissue's range (BOA's bounds: inclusive, air strict)."""
    if tissue == "bone":
        return hu >= 300.0
    if tissue == "muscle":
        return (hu >= -29.0) & (hu <= 150.0)
    if tissue == "adipose":
        return (hu >= -190.0) & (hu <= -30.0)
    if tissue == "air":
        return hu < -400.0
    raise ValueError(f"unknown tissue {tissue!r}")
