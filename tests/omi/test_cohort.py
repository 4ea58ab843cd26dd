"""The data site's cohort (issue 14): validation, the QIDO-RS query on real Orthanc, the model
run over the cohort on real MLServer, and the aggregates that may leave the site."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import structlog.testing
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from requests.adapters import HTTPAdapter

from dsf_bridge.omi.aggregates import ClassCounts, NumericAggregate
from dsf_bridge.omi.cohort import (
    CONVERSION_FAILED,
    REQUEST_INVALID,
    Cohort,
    CohortError,
    CohortOutcome,
    CohortSeries,
    check_cohort,
    run_cohort,
    select_series,
    site_aggregates,
)
from dsf_bridge.omi.contract import load_contract, resolve_contract
from dsf_bridge.omi.conversion import Measurement
from dsf_bridge.omi.dicomweb import (
    ArchiveUnavailableError,
    DicomWebArchive,
    DicomWebError,
)
from dsf_bridge.omi.execution import infer_study
from dsf_bridge.omi.inference import HttpInferenceClient, InferenceError, ModelNotReadyError
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess, free_port
from tests.components import (
    BROKEN_MODEL,
    DENSITY_CONTRACT,
    DENSITY_MODEL,
    REFERENCE_MODEL,
    WARMING_MODEL,
)
from tests.omi.data import make_series

TISSUE = resolve_contract("tissue-composition")
DENSITY = load_contract(DENSITY_CONTRACT)
DEVICE = {"type": "Device", "identifier": {"system": "urn:test", "value": "model"}}
IN_RANGE = Cohort.create(
    ["CT"], study_date_from=dt.date(2020, 1, 1), study_date_to=dt.date(2024, 12, 31)
)


# -- the cohort itself --------------------------------------------------------------------------


def test_create_normalises_and_round_trips_through_json() -> None:
    cohort = Cohort.create(
        [" ct", "MR", "CT"],
        body_part=" abdomen ",
        study_date_from="2020-01-01",
        study_date_to=dt.date(2024, 12, 31),
        series_description="AX*",
    )
    assert cohort.modalities == ("CT", "MR")
    assert cohort.body_part == "ABDOMEN"
    assert Cohort.from_json(json.loads(json.dumps(cohort.to_json()))) == cohort
    assert cohort.describe() == (
        "CT, MR, body part ABDOMEN, studies 2020-01-01..2024-12-31, series description 'AX*'"
    )
    assert Cohort.create("CT", study_date_to="2021-06-30").describe() == "CT, studies ..2021-06-30"
    assert cohort.qido_filters("MR") == {
        "Modality": "MR",
        "BodyPartExamined": "ABDOMEN",
        "StudyDate": "20200101-20241231",
        "SeriesDescription": "AX*",
    }
    assert Cohort.create("CT", study_date_from="2020-01-01").qido_filters("CT") == {
        "Modality": "CT",
        "StudyDate": "20200101-",
    }


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Cohort(modalities=()), "cohort-modality: the cohort names no modality"),
        (lambda: Cohort(modalities=["CT"]), "must be a tuple"),  # type: ignore[arg-type]
        (lambda: Cohort(modalities=("ct",)), "'ct' is not a DICOM modality code"),
        (lambda: Cohort.create(["C T"]), "'C T' is not a DICOM modality code"),
        (lambda: Cohort(modalities=("CT", "CT")), "named twice"),
        (lambda: Cohort(("CT",), body_part="abdomen"), "cohort-body-part: 'abdomen'"),
        (lambda: Cohort.create("CT", body_part="A" * 17), "cohort-body-part"),
        (
            lambda: Cohort.create("CT", study_date_from="2024-01-02", study_date_to="2024-01-01"),
            r"cohort-study-date-from \(2024-01-02\) is after cohort-study-date-to",
        ),
        (lambda: Cohort.create("CT", study_date_to="31.12.2024"), "is not a date"),
        (lambda: Cohort.create("CT", series_description="A" * 65), "65 characters, at most 64"),
        (lambda: Cohort.create("CT", series_description="AX\\COR"), "no backslash"),
        (lambda: Cohort.create("CT", series_description="AX\nCOR"), "no backslash"),
    ],
)
def test_invalid_cohorts_name_the_field(make: Any, message: str) -> None:
    with pytest.raises(CohortError, match=message) as info:
        make()
    assert info.value.retryable is False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"modalities": ["CT"], "patient_id": "X"}, "unknown keys patient_id"),
        ({"modalities": "CT"}, "must be a list"),
        ({"body_part": "CHEST"}, "must be a list"),
        ({"modalities": ["CT"], "study_date_from": 20200101}, "'study_date_from' must be a text"),
        ({"modalities": ["CT"], "study_date_to": "2020-13-01"}, "is not a date"),
        (["CT"], "must be a JSON object"),
    ],
)
def test_from_json_is_strict(data: object, message: str) -> None:
    with pytest.raises(CohortError, match=message):
        Cohort.from_json(data)


def test_a_cohort_the_service_cannot_take_is_refused() -> None:
    check_cohort(Cohort.create("CT"), TISSUE)
    with pytest.raises(CohortError, match="accepts CT, not MR"):
        check_cohort(Cohort.create(["CT", "MR"]), TISSUE)


def test_cohort_series_keeps_uids_out_of_its_repr() -> None:
    series = CohortSeries("1.2.3.4", "1.2.3.5", "CT", None, 3)
    assert "1.2.3" not in repr(series)


# -- the cohort query on real Orthanc ------------------------------------------------------------


@pytest.fixture
async def archive(orthanc: OrthancProcess) -> AsyncIterator[DicomWebArchive]:
    client = DicomWebArchive(
        orthanc.dicomweb_url, timeout=10.0, retry=RetryPolicy(attempts=2, initial_delay=0.05)
    )
    try:
        yield client
    finally:
        client.close()


def _tag() -> str:
    """A body part no other test stores: Orthanc lives for the whole session, so each test
    finds its own studies by it."""
    return "T" + uuid.uuid4().hex[:12].upper()


def _series(
    template: Dataset,
    *,
    slices: int = 1,
    modality: str = "CT",
    body_part: str,
    date: str = "20220615",
    description: str = "AXIAL",
    study: str | None = None,
) -> list[Dataset]:
    datasets = make_series(template, slices)
    for ds in datasets:
        ds.Modality = modality
        ds.BodyPartExamined = body_part
        ds.StudyDate = date
        ds.SeriesDescription = description
        if study is not None:
            ds.StudyInstanceUID = study
    return datasets


async def _store(archive: DicomWebArchive, template: Dataset, **kwargs: Any) -> list[Dataset]:
    datasets = _series(template, **kwargs)
    await archive.store(datasets)
    return datasets


def _studies(selected: Sequence[CohortSeries]) -> set[str]:
    return {s.study_instance_uid for s in selected}


async def test_select_finds_exactly_the_cohort(archive: DicomWebArchive, ct_small: Dataset) -> None:
    part, other = _tag(), _tag()
    dates = ["20200101", "20210304", "20220615", "20231111", "20241231", "20191231", "20250101"]
    ct = [(await _store(archive, ct_small, body_part=part, date=d))[0] for d in dates]
    mr = (await _store(archive, ct_small, modality="MR", body_part=part))[0]
    elsewhere = (await _store(archive, ct_small, body_part=other))[0]

    def cohort(modalities: Sequence[str], **dates: str) -> Cohort:
        return Cohort.create(modalities, body_part=part, **dates)

    in_range = {"study_date_from": "2020-01-01", "study_date_to": "2024-12-31"}
    selected = await select_series(archive, cohort(["CT"], **in_range), max_studies=100)
    assert _studies(selected) == {str(ds.StudyInstanceUID) for ds in ct[:5]}
    assert {(s.modality, s.body_part, s.instance_count) for s in selected} == {("CT", part, 1)}
    assert [s.study_instance_uid for s in selected] == sorted(_studies(selected))

    both = await select_series(archive, cohort(["CT", "MR"], **in_range), max_studies=100)
    assert _studies(both) == {str(ds.StudyInstanceUID) for ds in [*ct[:5], mr]}
    open_end = await select_series(
        archive, cohort(["CT"], study_date_from="2020-01-01"), max_studies=100
    )
    assert _studies(open_end) == {str(ds.StudyInstanceUID) for ds in [*ct[:5], ct[6]]}
    open_start = await select_series(
        archive, cohort(["CT"], study_date_to="2024-12-31"), max_studies=100
    )
    assert _studies(open_start) == {str(ds.StudyInstanceUID) for ds in ct[:6]}
    assert str(elsewhere.StudyInstanceUID) not in _studies(open_start)
    # The other body part is found by its own cohort only.
    alone = await select_series(archive, Cohort.create("CT", body_part=other), max_studies=1)
    assert _studies(alone) == {str(elsewhere.StudyInstanceUID)}


async def test_series_description_wildcards(archive: DicomWebArchive, ct_small: Dataset) -> None:
    part = _tag()
    stored = {
        description: (await _store(archive, ct_small, body_part=part, description=description))[0]
        for description in ("AXIAL-5MM", "AXIAL-1MM", "CORONAL-5MM")
    }

    async def matching(pattern: str) -> set[str]:
        cohort = Cohort.create("CT", body_part=part, series_description=pattern)
        return _studies(await select_series(archive, cohort, max_studies=10))

    def studies(*descriptions: str) -> set[str]:
        return {str(stored[d].StudyInstanceUID) for d in descriptions}

    assert await matching("AXIAL*") == studies("AXIAL-5MM", "AXIAL-1MM")
    assert await matching("*-5MM") == studies("AXIAL-5MM", "CORONAL-5MM")
    assert await matching("AXIAL-?MM") == studies("AXIAL-5MM", "AXIAL-1MM")
    assert await matching("CORONAL-5MM") == studies("CORONAL-5MM")
    assert await matching("SAGITTAL*") == set()


async def test_one_series_per_study_most_instances_then_smaller_uid(
    archive: DicomWebArchive, ct_small: Dataset
) -> None:
    part = _tag()
    small = await _store(archive, ct_small, body_part=part, slices=1)
    study = str(small[0].StudyInstanceUID)
    large = await _store(archive, ct_small, body_part=part, slices=3, study=study)
    tied_study = generate_uid()
    tied = [
        await _store(archive, ct_small, body_part=part, slices=2, study=tied_study)
        for _ in range(2)
    ]
    selected = {
        s.study_instance_uid: s
        for s in await select_series(archive, Cohort.create("CT", body_part=part), max_studies=2)
    }
    assert set(selected) == {study, tied_study}
    assert selected[study].series_instance_uid == str(large[0].SeriesInstanceUID)
    assert selected[study].instance_count == 3
    assert selected[tied_study].series_instance_uid == min(
        str(series[0].SeriesInstanceUID) for series in tied
    )


async def test_more_studies_than_max_studies_are_refused(
    archive: DicomWebArchive, ct_small: Dataset
) -> None:
    part = _tag()
    for _ in range(3):
        await _store(archive, ct_small, body_part=part)
    cohort = Cohort.create("CT", body_part=part)
    assert len(await select_series(archive, cohort, max_studies=3)) == 3
    with pytest.raises(
        CohortError, match=r"more than 2 studies .* at most 2 .*max_studies"
    ) as info:
        await select_series(archive, cohort, max_studies=2)
    assert f"body part {part}" in str(info.value)
    with pytest.raises(ValueError, match="max_studies must be at least 1"):
        await select_series(archive, cohort, max_studies=0)


class _CountingSession(requests.Session):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        self.urls.append(str(url))
        return super().request(str(method), url, *args, **kwargs)


async def test_select_pages_through_orthanc(orthanc: OrthancProcess, ct_small: Dataset) -> None:
    session = _CountingSession()
    archive = DicomWebArchive(orthanc.dicomweb_url, timeout=10.0, session=session)
    try:
        part = _tag()
        stored = [(await _store(archive, ct_small, body_part=part))[0] for _ in range(5)]
        session.urls.clear()
        selected = await select_series(
            archive, Cohort.create("CT", body_part=part), max_studies=10, page_size=2
        )
    finally:
        archive.close()
    assert _studies(selected) == {str(ds.StudyInstanceUID) for ds in stored}
    offsets = [parse_qs(urlsplit(url).query)["offset"] for url in session.urls]
    assert offsets == [["0"], ["2"], ["4"], ["5"]]  # until an empty page
    query = parse_qs(urlsplit(session.urls[0]).query)
    assert query["Modality"] == ["CT"] and query["BodyPartExamined"] == [part]
    assert query["limit"] == ["2"]


# -- paging against archives that cap or ignore offset (an in-memory transport) ------------------


class _FakeQido(HTTPAdapter):
    """Answers QIDO-RS /series from a list, capping each answer at ``cap`` and honouring
    ``offset`` unless told not to."""

    def __init__(self, items: Sequence[Mapping[str, Any]], *, cap: int, offsets: bool) -> None:
        super().__init__()
        self.items, self.cap, self.offsets = list(items), cap, offsets
        self.requests = 0

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        query = parse_qs(urlsplit(str(request.url)).query)
        start = int(query["offset"][0]) if self.offsets else 0
        size = min(self.cap, int(query["limit"][0]))
        response = requests.Response()
        response.status_code = 200
        response._content = json.dumps(self.items[start : start + size]).encode()
        response.headers["Content-Type"] = "application/dicom+json"
        response.url = str(request.url)
        response.request = request
        return response


def _items(count: int) -> list[dict[str, Any]]:
    return [
        {
            "0020000D": {"vr": "UI", "Value": [f"1.2.9.{n}"]},
            "0020000E": {"vr": "UI", "Value": [f"1.2.9.{n}.1"]},
            "00080060": {"vr": "CS", "Value": ["CT"]},
            "00201209": {"vr": "IS", "Value": [2]},
        }
        for n in range(count)
    ]


def _fake_archive(adapter: _FakeQido) -> DicomWebArchive:
    session = requests.Session()
    session.mount("http://", adapter)
    return DicomWebArchive("http://archive.test/dicom-web", session=session)


async def test_an_archive_capping_its_answers_is_still_read_to_the_end() -> None:
    archive = _fake_archive(_FakeQido(_items(7), cap=3, offsets=True))
    selected = await select_series(archive, Cohort.create("CT"), max_studies=10, page_size=500)
    assert len(selected) == 7


async def test_an_archive_ignoring_offset_is_an_error_not_a_loop() -> None:
    archive = _fake_archive(_FakeQido(_items(7), cap=3, offsets=False))
    with pytest.raises(DicomWebError, match="does not page with limit and offset"):
        await select_series(archive, Cohort.create("CT"), max_studies=10)


async def test_the_search_stops_once_max_studies_is_passed() -> None:
    adapter = _FakeQido(_items(50), cap=500, offsets=True)
    archive = _fake_archive(adapter)
    with pytest.raises(CohortError, match=r"more than 4 studies .* at most 4"):
        await select_series(archive, Cohort.create("CT"), max_studies=4, page_size=3)
    assert adapter.requests == 2  # not the 17 pages of the whole answer


@pytest.mark.parametrize("size", [101, 137, 499])
async def test_a_refused_cohort_does_not_say_how_many_studies_it_has(size: int) -> None:
    # The refusal goes to the coordinator: a cohort whose studies all come in the first page
    # would be counted exactly (137 of 137), unobfuscated, and two such refusals differenced.
    archive = _fake_archive(_FakeQido(_items(size), cap=500, offsets=True))
    with pytest.raises(CohortError) as info:
        await select_series(archive, Cohort.create("CT"), max_studies=100)
    assert "more than 100 studies" in str(info.value)
    assert str(size) not in str(info.value)


# -- the model over the cohort on real MLServer ---------------------------------------------------


@pytest.fixture
async def inference(mlserver: MLServerProcess) -> AsyncIterator[HttpInferenceClient]:
    async with HttpInferenceClient(mlserver.base_url, timeout=30.0) as client:
        yield client


async def test_run_cohort_collects_what_infer_study_finds(
    archive: DicomWebArchive, inference: HttpInferenceClient, ct_small: Dataset
) -> None:
    part = _tag()
    good = [await _store(archive, ct_small, body_part=part, slices=slices) for slices in (1, 2, 3)]
    broken = _series(ct_small, body_part=part, slices=2)
    for ds in broken:
        del ds.PixelSpacing  # the contract sends the spacing: no conversion without it
    await archive.store(broken)
    with structlog.testing.capture_logs() as logged:
        selected = await select_series(archive, Cohort.create("CT", body_part=part), max_studies=10)
        assert len(selected) == 4
        outcome = await run_cohort(
            archive,
            inference,
            selected,
            contract=TISSUE,
            model=REFERENCE_MODEL.name,
            device=DEVICE,
            request_id="cohort-1",
        )
    assert (outcome.matched, outcome.inferred) == (4, 3)
    assert outcome.failures == {CONVERSION_FAILED: 1}
    expected: dict[str, list[float]] = {m.code.code: [] for m in TISSUE.outputs.measurements}
    for series in selected:
        if series.study_instance_uid == str(broken[0].StudyInstanceUID):
            continue
        single = await infer_study(
            archive,
            inference,
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            contract=TISSUE,
            model=REFERENCE_MODEL.name,
            device=DEVICE,
        )
        for finding in single.findings:
            if isinstance(finding, Measurement) and finding.value is not None:
                expected[finding.code.code].append(finding.value)
    assert outcome.values == expected
    assert len(outcome.values["body-area"]) == 3
    # A volume needs two slices: the one-slice study has none, and counts as absent.
    assert len(outcome.values["body-volume"]) == 2 and outcome.absent["body-volume"] == 1
    for code, found in outcome.values.items():
        assert len(found) + outcome.absent[code] == outcome.inferred
    assert outcome.labels == {}

    text = repr(logged)
    events = {entry["event"] for entry in logged}
    assert {"cohort.selected", "cohort.study_failed", "cohort.inferred"} <= events
    for datasets in [*good, broken]:
        assert str(datasets[0].StudyInstanceUID) not in text
        assert str(datasets[0].SeriesInstanceUID) not in text


async def test_run_cohort_counts_labels_and_refused_series(
    archive: DicomWebArchive, inference: HttpInferenceClient, ct_small: Dataset
) -> None:
    part = _tag()
    for slices in (1, 1, 2):  # the density contract takes one slice (accepts.max_slices)
        await _store(archive, ct_small, body_part=part, slices=slices)
    selected = await select_series(archive, Cohort.create("CT", body_part=part), max_studies=9)
    outcome = await run_cohort(
        archive, inference, selected, contract=DENSITY, model=DENSITY_MODEL.name, device=DEVICE
    )
    assert (outcome.matched, outcome.inferred) == (3, 2)
    assert outcome.failures == {REQUEST_INVALID: 1}
    expected = []
    for series in selected:
        if series.instance_count == 1:
            single = await infer_study(
                archive,
                inference,
                study_instance_uid=series.study_instance_uid,
                contract=DENSITY,
                model=DENSITY_MODEL.name,
                device=DEVICE,
            )
            expected.append(single.summary()["density-class"]["value"])
    assert outcome.labels == {"density-class": expected}
    assert set(expected) <= {"fatty", "dense"}
    assert outcome.values == {} and outcome.absent == {}


@pytest.mark.parametrize(
    ("model", "error"),
    [(WARMING_MODEL.name, ModelNotReadyError), (BROKEN_MODEL.name, InferenceError)],
    ids=["not-ready", "failing"],
)
async def test_a_failing_server_ends_the_run(
    archive: DicomWebArchive,
    inference: HttpInferenceClient,
    ct_small: Dataset,
    model: str,
    error: type[InferenceError],
) -> None:
    part = _tag()
    await _store(archive, ct_small, body_part=part)
    selected = await select_series(archive, Cohort.create("CT", body_part=part), max_studies=9)
    with pytest.raises(error):
        await run_cohort(archive, inference, selected, contract=TISSUE, model=model, device=DEVICE)


async def test_an_unreachable_archive_ends_the_run(inference: HttpInferenceClient) -> None:
    down = DicomWebArchive(
        f"http://127.0.0.1:{free_port()}/dicom-web",
        retry=RetryPolicy(attempts=1, initial_delay=0.01),
    )
    series = CohortSeries("1.2.3.4", "1.2.3.5", "CT", None, 1)
    with pytest.raises(ArchiveUnavailableError) as info:
        await run_cohort(
            down, inference, [series], contract=TISSUE, model=REFERENCE_MODEL.name, device=DEVICE
        )
    assert "1.2.3.4" not in str(info.value)
    with pytest.raises(ArchiveUnavailableError):
        await select_series(down, Cohort.create("CT"), max_studies=5)


# -- the aggregates ------------------------------------------------------------------------------


class _Tens:
    """An obfuscator that rounds every count up to tens (deterministic, for the test)."""

    def obfuscate(self, count: int) -> int:
        return -(-count // 10) * 10


def test_site_aggregates_follow_the_contract_and_k() -> None:
    outcome = CohortOutcome(
        matched=8,
        inferred=6,
        values={"body-area": [400.0, 410.0, 420.0, 430.0, 440.0, 450.0], "body-mean-hu": [1.0]},
        labels={},
        absent={},
        failures={CONVERSION_FAILED: 2},
    )
    aggregates = site_aggregates(outcome, TISSUE, k=5)
    assert [a.measurement for a in aggregates] == [m.code.code for m in TISSUE.outputs.measurements]
    by_name = {a.measurement: a for a in aggregates}
    area = by_name["body-area"]
    assert isinstance(area, NumericAggregate) and not area.suppressed
    assert (area.n, area.mean, area.median) == (6, 425.0, None)  # quartiles from 2k on
    with_quartiles = site_aggregates(outcome, TISSUE, k=3)[0]
    assert isinstance(with_quartiles, NumericAggregate)
    assert (with_quartiles.q1, with_quartiles.median, with_quartiles.q3) == (412.5, 425.0, 437.5)
    assert by_name["body-mean-hu"].suppressed  # one value, below k
    assert by_name["body-volume"].suppressed  # no value at all
    assert not site_aggregates(outcome, TISSUE, k=6)[0].suppressed
    assert site_aggregates(outcome, TISSUE, k=7)[0].suppressed
    obfuscated = site_aggregates(outcome, TISSUE, k=5, obfuscator=_Tens())[0]
    assert isinstance(obfuscated, NumericAggregate)
    assert (obfuscated.n, obfuscated.obfuscated, obfuscated.mean) == (10, True, 425.0)


def test_site_class_counts_use_the_contracts_classes() -> None:
    def counts(fatty: int, dense: int, k: int) -> ClassCounts:
        outcome = CohortOutcome(
            matched=fatty + dense,
            inferred=fatty + dense,
            values={},
            labels={"density-class": ["dense"] * dense + ["fatty"] * fatty},
            absent={},
            failures={},
        )
        (table,) = site_aggregates(outcome, DENSITY, k=k)
        assert isinstance(table, ClassCounts)
        return table

    shown = counts(7, 6, k=5)
    assert list(shown.counts.items()) == [("fatty", 7), ("dense", 6)] and shown.n == 13
    # One small class of two would follow from the total: the whole table goes.
    assert counts(7, 1, k=5).suppressed
    assert counts(3, 1, k=5).suppressed
