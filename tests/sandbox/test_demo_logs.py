"""``dsf-bridge demo`` logged at debug level from every site: no study, series or instance UID
and no patient id or name in any log line (the digest of a UID is what a line may carry)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID

from dsf_bridge.logs import configure_logging, uid_digest
from dsf_bridge.sandbox import demo


@pytest.fixture
def _logging_restored() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    structlog.reset_defaults()


def _identifiers(datasets: list[Dataset]) -> set[str]:
    found = set()
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            found.add(str(getattr(ds, keyword)))
        found.add(str(ds.PatientID))
        found.add(str(ds.PatientName))
        # Each name component too, unless short enough to be found in any text ("CT1").
        found.update(part for part in str(ds.PatientName).split("^") if len(part) >= 6)
    return {value for value in found if value}


@pytest.mark.usefixtures("_logging_restored")
def test_the_demo_logs_no_study_uid_and_no_patient(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[Dataset] = []

    def load_ct_small() -> Dataset:
        ds = original_load()
        loaded.append(ds)
        return ds

    def make_series(template: Dataset, slices: int = 5) -> list[Dataset]:
        series = original_series(template, slices)
        loaded.extend(series)
        return series

    original_load, original_series = demo.load_ct_small, demo.make_series
    monkeypatch.setattr(demo, "load_ct_small", load_ct_small)
    monkeypatch.setattr(demo, "make_series", make_series)
    logs = io.StringIO()
    configure_logging("debug", "json", stream=logs)
    out, err = io.StringIO(), io.StringIO()

    status = demo.run_demo(out=out, err=err, timeout=120)

    if status == 2:
        pytest.fail(err.getvalue())  # a component is missing: the message says how to install
    assert status == 0, err.getvalue()
    identifiers = _identifiers(loaded)
    studies = {str(ds.StudyInstanceUID) for ds in loaded}
    assert len(studies) == 3  # CT_small.dcm's study, the series and the denser slice made from it
    assert studies <= identifiers
    assert all(study in out.getvalue() for study in studies)  # the demo did ask for them
    lines = logs.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) > 500  # debug: libraries' request lines included
    for line in [*lines, *err.getvalue().splitlines()]:
        leaked = {value for value in identifiers if value in line}
        assert not leaked, f"{sorted(leaked)} in: {line[:300]}"
        # The result's UIDs (the segmentation, the result series) are made by pydicom too.
        assert PYDICOM_ROOT_UID not in line, line[:300]
    # The providing site's step that reads the archive logged, and logged the UIDs' digests
    # where the UIDs would have been (the archive's request lines).
    assert any(r.get("event") == "inference.executed" for r in records)
    digests = {uid_digest(study) for study in studies}
    assert {d for d in digests if any(d in line for line in lines)} == digests
