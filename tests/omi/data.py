"""CT test data: ``CT_small.dcm`` from the pydicom wheel, and a pseudonymous five-slice series
made from it. Nothing is downloaded."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dsf_bridge.sandbox.demo import make_series

__all__ = [
    "CT_SMALL_PATIENT_VALUES",
    "SERIES_SLICES",
    "ct_series",
    "ct_small",
    "load_ct_small",
    "make_series",
]

SERIES_SLICES = 5
# The sample's own (fictitious) patient attributes: results must never echo them.
CT_SMALL_PATIENT_VALUES = ("CompressedSamples^CT1", "CompressedSamples", "1CT1", "ABCD1234")


def load_ct_small() -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover - ships in every pydicom wheel
        pytest.fail("CT_small.dcm is missing from the pydicom installation")
    return pydicom.dcmread(path)


@pytest.fixture(scope="session")
def ct_small() -> Dataset:
    return load_ct_small()


@pytest.fixture(scope="session")
def ct_series(ct_small: Dataset) -> list[Dataset]:
    return make_series(ct_small, SERIES_SLICES)
