"""Fixtures of the OMI adapter tests: real Orthanc and MLServer, and CT data from pydicom."""

from tests.omi.data import ct_series, ct_small

# orthanc and mlserver come from tests/conftest.py (one session-wide instance each).
__all__ = ["ct_series", "ct_small"]
