"""DICOMweb access against a real Orthanc with its DICOMweb plugin: STOW-RS, QIDO-RS, WADO-RS,
and the failures a process must tell apart (study not in the archive, archive down)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset
from requests.adapters import BaseAdapter

from dsf_bridge.omi.dicomweb import (
    ArchiveUnavailableError,
    DicomWebArchive,
    DicomWebError,
    StudyNotFoundError,
)
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import OrthancProcess, free_port
from dsf_bridge.telemetry import REGISTRY


def _requests(operation: str, outcome: str) -> float:
    """DICOMweb requests measured so far (``dsf_bridge_dicomweb_request_duration_seconds``)."""
    labels = {"operation": operation, "outcome": outcome}
    count = REGISTRY.get_sample_value("dsf_bridge_dicomweb_request_duration_seconds_count", labels)
    return count or 0.0


@pytest.fixture
async def archive(orthanc: OrthancProcess) -> AsyncIterator[DicomWebArchive]:
    client = DicomWebArchive(
        orthanc.dicomweb_url, timeout=10.0, retry=RetryPolicy(attempts=2, initial_delay=0.05)
    )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def stored(
    archive: DicomWebArchive, ct_small: Dataset, ct_series: list[Dataset]
) -> list[Dataset]:
    """CT_small and the five-slice series in the archive (STOW-RS is idempotent in Orthanc)."""
    # Shuffled on purpose: retrieval order must not matter downstream.
    await archive.store([ct_series[3], ct_small, ct_series[0], *ct_series[4:], *ct_series[1:3]])
    return [ct_small, *ct_series]


async def test_store_reports_every_instance(
    archive: DicomWebArchive, ct_series: list[Dataset]
) -> None:
    result = await archive.store(ct_series)
    assert set(result.stored) == {str(ds.SOPInstanceUID) for ds in ct_series}
    assert result.failed == ()
    assert (await archive.store([])).stored == ()


async def test_search_series_and_instances(
    archive: DicomWebArchive, stored: list[Dataset], ct_series: list[Dataset]
) -> None:
    study = str(ct_series[0].StudyInstanceUID)
    before = _requests("search_series", "ok"), _requests("search_instances", "ok")
    series = await archive.search_series(study)
    assert [(s.series_instance_uid, s.modality, s.instance_count) for s in series] == [
        (str(ct_series[0].SeriesInstanceUID), "CT", 5)
    ]
    instances = await archive.search_instances(study, str(ct_series[0].SeriesInstanceUID))
    assert {i.sop_instance_uid for i in instances} == {str(ds.SOPInstanceUID) for ds in ct_series}
    assert {i.instance_number for i in instances} == {1, 2, 3, 4, 5}
    # Each request is measured, by operation and outcome (never by study).
    assert _requests("search_series", "ok") == before[0] + 1
    assert _requests("search_instances", "ok") == before[1] + 1


async def test_retrieve_study_returns_the_pixels(
    archive: DicomWebArchive, stored: list[Dataset], ct_small: Dataset
) -> None:
    datasets = await archive.retrieve_study(str(ct_small.StudyInstanceUID))
    assert len(datasets) == 1
    assert datasets[0].SOPInstanceUID == ct_small.SOPInstanceUID
    assert (datasets[0].pixel_array == ct_small.pixel_array).all()


async def test_retrieve_named_series(
    archive: DicomWebArchive, stored: list[Dataset], ct_series: list[Dataset]
) -> None:
    study, series = str(ct_series[0].StudyInstanceUID), str(ct_series[0].SeriesInstanceUID)
    datasets = await archive.retrieve_study(study, series)
    assert len(datasets) == 5
    with pytest.raises(StudyNotFoundError, match=r"series 1\.2\.3 is not part of study"):
        await archive.retrieve_study(study, "1.2.3")


async def test_study_not_in_archive(archive: DicomWebArchive, stored: list[Dataset]) -> None:
    with pytest.raises(
        StudyNotFoundError, match=r"study 1\.2\.3\.4\.5 is not in the archive"
    ) as info:
        await archive.retrieve_study("1.2.3.4.5")
    assert not info.value.retryable
    with pytest.raises(StudyNotFoundError, match="has no instances"):
        await archive.search_instances("1.2.3.4.5")
    with pytest.raises(StudyNotFoundError, match="not in the archive") as wado:
        await archive.retrieve_series("1.2.3.4.5", "1.2.3.4.6")
    assert wado.value.status == 404


async def test_closed_port_is_archive_down() -> None:
    client = DicomWebArchive(
        f"http://127.0.0.1:{free_port()}/dicom-web",
        timeout=2.0,
        retry=RetryPolicy(attempts=2, initial_delay=0.01),
    )
    before = _requests("search_series", "error")
    try:
        with pytest.raises(ArchiveUnavailableError, match="cannot be reached") as info:
            await client.retrieve_study("1.2.3.4.5")
    finally:
        client.close()
    assert _requests("search_series", "error") == before + 2  # both tries
    assert info.value.retryable
    assert not isinstance(info.value, StudyNotFoundError)
    # The reason in the system's words, not requests' text with the URL (which names the
    # study): the message goes back to the requesting site in the result Task.
    assert str(info.value).endswith("cannot be reached (search_series: Connection refused)")
    assert "1.2.3.4.5" not in str(info.value)


async def test_stopped_orthanc_is_archive_down(tmp_path: Path, ct_small: Dataset) -> None:
    with OrthancProcess(tmp_path / "orthanc").start() as server:
        client = DicomWebArchive(server.dicomweb_url, timeout=5.0, retry=RetryPolicy(attempts=1))
        try:
            await client.store([ct_small])
            assert await client.search_series(str(ct_small.StudyInstanceUID))
            server.stop()
            with pytest.raises(ArchiveUnavailableError, match="cannot be reached"):
                await client.search_series(str(ct_small.StudyInstanceUID))
        finally:
            client.close()


class _CannedAdapter(BaseAdapter):
    """A requests transport that answers every request with one canned status and body."""

    def __init__(self, status: int, body: bytes = b"", content_type: str = "") -> None:
        super().__init__()
        self.status, self.body, self.content_type = status, body, content_type
        self.calls = 0
        self.extra_headers: dict[str, str] = {}

    def send(  # noqa: PLR0917 - requests fixes this signature
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        self.calls += 1
        response = requests.Response()
        response.status_code = self.status
        response._content = self.body
        response.headers["Content-Type"] = self.content_type
        response.headers.update(self.extra_headers)
        response.url = str(request.url)
        response.request = request
        return response

    def close(self) -> None:
        pass


def _canned_archive(adapter: _CannedAdapter) -> DicomWebArchive:
    session = requests.Session()
    session.mount("http://", adapter)
    return DicomWebArchive(
        "http://archive.test/dicom-web",
        session=session,
        retry=RetryPolicy(attempts=3, initial_delay=0.001),
    )


@pytest.mark.parametrize(
    ("status", "body"), [(204, b""), (200, b"[]")], ids=["204", "200-empty-list"]
)
async def test_empty_search_answers_mean_not_found(status: int, body: bytes) -> None:
    archive = _canned_archive(_CannedAdapter(status, body, "application/dicom+json"))
    with pytest.raises(StudyNotFoundError):
        await archive.search_series("1.2.3")
    archive.close()


async def test_server_errors_are_retried_then_reported() -> None:
    adapter = _CannedAdapter(503)
    archive = _canned_archive(adapter)
    with pytest.raises(ArchiveUnavailableError, match=r"failed \(search_series, HTTP 503\)"):
        await archive.search_series("1.2.3")
    archive.close()
    assert adapter.calls == 3


async def test_retry_after_is_honoured_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _CannedAdapter(503)
    adapter.extra_headers = {"Retry-After": "2"}
    session = requests.Session()
    session.mount("http://", adapter)
    policy = RetryPolicy(attempts=3, initial_delay=0.001, retry_after_cap=1.5)
    archive = DicomWebArchive("http://archive.test/dicom-web", session=session, retry=policy)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    with pytest.raises(ArchiveUnavailableError):
        await archive.search_series("1.2.3")
    archive.close()
    assert waits == [1.5, 1.5]  # the server asked for 2 s; the cap allows 1.5


async def test_forbidden_is_not_retried() -> None:
    adapter = _CannedAdapter(403)
    archive = _canned_archive(adapter)
    with pytest.raises(DicomWebError, match=r"refused search_series \(HTTP 403\)") as info:
        await archive.search_series("1.2.3")
    archive.close()
    assert not info.value.retryable
    assert adapter.calls == 1
