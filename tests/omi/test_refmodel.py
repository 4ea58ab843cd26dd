"""The reference model's arithmetic (DESIGN 5a) on real DICOM, without any server."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dsf_bridge.sandbox.refmodel import TISSUES, body_mask, tissue_composition

# DESIGN 5a: CT_small.dcm, cm² per slice, and mean muscle HU.
REFERENCE_AREAS_CM2 = {"body": 56.18, "bone": 4.48, "muscle": 29.60, "adipose": 13.84, "air": 0.24}
REFERENCE_MUSCLE_MEAN_HU = 38.3


def _hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_ct_small_matches_design_reference(ct_small: Dataset) -> None:
    spacing = (float(ct_small.SliceThickness), *map(float, ct_small.PixelSpacing))
    result = tissue_composition(_hu(ct_small), spacing)
    areas = dict(zip(TISSUES, result.area_cm2[0], strict=True))
    for tissue, expected in REFERENCE_AREAS_CM2.items():
        assert areas[tissue] == pytest.approx(expected, abs=0.005), tissue
    muscle = TISSUES.index("muscle")
    assert result.mean_hu[muscle] == pytest.approx(REFERENCE_MUSCLE_MEAN_HU, abs=0.05)
    # One 5 mm slice: volume = area x 0.5 cm.
    np.testing.assert_allclose(result.volume_ml, result.area_cm2[0] * 0.5)


def test_tissues_lie_inside_the_body_and_do_not_overlap(ct_small: Dataset) -> None:
    result = tissue_composition(_hu(ct_small), (5.0, 0.661468, 0.661468))
    body = result.voxel_count[0]
    assert result.voxel_count[1:].sum() <= body


def test_body_mask_keeps_largest_component_and_fills_holes() -> None:
    hu = np.full((20, 20), -1000.0)
    hu[2:12, 2:12] = 40.0  # the body: 100 px
    hu[5:8, 5:8] = -900.0  # a hole inside it (lung-like air): filled, 9 px
    hu[15:18, 15:18] = 40.0  # a separate small object (the table): dropped
    mask = body_mask(hu)
    assert mask.sum() == 100
    assert not mask[16, 16]
    result = tissue_composition(hu, (1.0, 10.0, 10.0))  # 1 cm² per pixel
    areas = dict(zip(TISSUES, result.area_cm2[0], strict=True))
    assert areas["body"] == pytest.approx(100.0)
    assert areas["air"] == pytest.approx(9.0)
    assert areas["muscle"] == pytest.approx(91.0)
    assert np.isnan(result.mean_hu[TISSUES.index("bone")])


def test_series_volume_sums_slices(ct_series: list[Dataset]) -> None:
    hu = np.stack([_hu(ds) for ds in ct_series])
    result = tissue_composition(hu, (5.0, 0.661468, 0.661468))
    assert result.area_cm2.shape == (len(ct_series), len(TISSUES))
    assert result.area_cm2[0, 0] == pytest.approx(56.18, abs=0.005)
    np.testing.assert_allclose(result.volume_ml, result.area_cm2.sum(axis=0) * 0.5)
    # The +10 HU per slice shifts tissue boundaries: slices measure differently.
    assert len(set(np.round(result.area_cm2[:, TISSUES.index("muscle")], 4))) > 1


@pytest.mark.parametrize(
    ("hu", "spacing"),
    [
        (np.zeros((2, 3, 4, 5)), (1.0, 1.0, 1.0)),
        (np.zeros((1, 4, 4)), (1.0, 1.0)),
        (np.zeros((1, 4, 4)), (0.0, 1.0, 1.0)),
    ],
)
def test_bad_input_is_refused(hu: np.ndarray, spacing: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match=r"shape|spacing"):
        tissue_composition(hu, spacing)
