"""One study through real Orthanc and real MLServer with infer_study, and each failure a
process must report distinctly: study not in the archive, archive down, model not ready,
unknown model, model failing."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import structlog.testing
from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset

from dsf_bridge.omi import execution
from dsf_bridge.omi.contract import RequestNotAcceptedError, resolve_contract
from dsf_bridge.omi.conversion import volume_from_datasets
from dsf_bridge.omi.dicomweb import (
    ArchiveUnavailableError,
    DicomWebArchive,
    SeriesInfo,
    StudyNotFoundError,
)
from dsf_bridge.omi.execution import infer_study
from dsf_bridge.omi.inference import (
    HttpInferenceClient,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from dsf_bridge.omi.report_sr import measurement_report
from dsf_bridge.omi.segmentation import segmentation_dataset
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import (
    KServeProcess,
    MLServerProcess,
    OrthancProcess,
    free_port,
)
from tests.components import BROKEN_MODEL, REFERENCE_MODEL, WARMING_MODEL
from tests.omi.test_refmodel import REFERENCE_AREAS_CM2

DEVICE = {"reference": "Device/tissue-composition", "type": "Device"}
TISSUE = resolve_contract("tissue-composition")


@pytest.fixture
async def archive(orthanc: OrthancProcess, ct_small: Dataset) -> AsyncIterator[DicomWebArchive]:
    client = DicomWebArchive(
        orthanc.dicomweb_url, timeout=10.0, retry=RetryPolicy(attempts=2, initial_delay=0.05)
    )
    await client.store([ct_small])
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def inference(mlserver: MLServerProcess) -> AsyncIterator[HttpInferenceClient]:
    async with HttpInferenceClient(mlserver.base_url, timeout=30.0) as client:
        yield client


async def test_ct_small_summary_matches_the_reference(
    archive: DicomWebArchive, inference: HttpInferenceClient, ct_small: Dataset
) -> None:
    outcome = await infer_study(
        archive,
        inference,
        study_instance_uid=str(ct_small.StudyInstanceUID),
        contract=TISSUE,
        model=REFERENCE_MODEL.name,
        device=DEVICE,
        request_id="business-key-1",
    )
    Bundle.model_validate(outcome.bundle)
    summary = outcome.summary()
    for tissue, expected in REFERENCE_AREAS_CM2.items():
        assert summary[f"{tissue}-area"] == {
            "value": pytest.approx(expected, abs=0.01),
            "unit": "cm2",
        }
    assert summary["muscle-mean-hu"] == {"value": 38.27, "unit": "HU"}
    assert "body-volume" not in summary
    assert outcome.slices == 1


async def test_series_summary_has_volumes(
    archive: DicomWebArchive, inference: HttpInferenceClient, ct_series: list[Dataset]
) -> None:
    await archive.store(ct_series)
    outcome = await infer_study(
        archive,
        inference,
        study_instance_uid=str(ct_series[0].StudyInstanceUID),
        series_instance_uid=str(ct_series[0].SeriesInstanceUID),
        contract=TISSUE,
        model=REFERENCE_MODEL.name,
        device=DEVICE,
    )
    assert outcome.slices == 5
    assert outcome.summary()["body-volume"]["unit"] == "mL"
    assert outcome.summary()["body-volume"]["value"] > 5 * 0.5 * 56
    assert outcome.segmentation_series_uid is None
    assert outcome.report_series_uid is None


async def test_segmentation_is_stored_in_the_study(
    archive: DicomWebArchive, inference: HttpInferenceClient, ct_series: list[Dataset]
) -> None:
    await archive.store(ct_series)
    study = str(ct_series[0].StudyInstanceUID)
    outcome = await infer_study(
        archive,
        inference,
        study_instance_uid=study,
        contract=TISSUE,
        model=REFERENCE_MODEL.name,
        device=DEVICE,
        segmentation=True,
    )
    assert outcome.segmentation_series_uid is not None
    series = {s.series_instance_uid: s for s in await archive.search_series(study)}
    seg = series[outcome.segmentation_series_uid]
    assert (seg.modality, seg.instance_count) == ("SEG", 1)
    # The reference contract's tissue measurements name their segments: an SR comes along.
    assert outcome.report_series_uid is not None
    assert series[outcome.report_series_uid].modality == "SR"
    assert outcome.summary()["body-volume"]["unit"] == "mL"  # measurements still complete


async def test_study_not_in_archive(
    archive: DicomWebArchive, inference: HttpInferenceClient
) -> None:
    with pytest.raises(StudyNotFoundError, match=r"study 1\.2\.3\.9 is not in the archive"):
        await infer_study(
            archive,
            inference,
            study_instance_uid="1.2.3.9",
            contract=TISSUE,
            model=REFERENCE_MODEL.name,
            device=DEVICE,
        )


async def test_archive_down(inference: HttpInferenceClient) -> None:
    down = DicomWebArchive(
        f"http://127.0.0.1:{free_port()}/dicom-web",
        retry=RetryPolicy(attempts=2, initial_delay=0.01),
    )
    try:
        with pytest.raises(ArchiveUnavailableError, match="cannot be reached") as info:
            await infer_study(
                down,
                inference,
                study_instance_uid="1.2.3",
                contract=TISSUE,
                model=REFERENCE_MODEL.name,
                device=DEVICE,
            )
    finally:
        down.close()
    assert info.value.retryable


@pytest.mark.parametrize(
    "case",
    [
        (WARMING_MODEL.name, ModelNotReadyError, "is not ready"),
        ("no-such-model", ModelNotFoundError, "does not serve model no-such-model"),
        (BROKEN_MODEL.name, InferenceError, r"failed \(HTTP 500\)"),
    ],
    ids=["not-ready", "unknown", "failing"],
)
async def test_model_failures(
    archive: DicomWebArchive,
    inference: HttpInferenceClient,
    ct_small: Dataset,
    case: tuple[str, type[InferenceError], str],
) -> None:
    model, error, message = case
    with pytest.raises(error, match=message):
        await infer_study(
            archive,
            inference,
            study_instance_uid=str(ct_small.StudyInstanceUID),
            contract=TISSUE,
            model=model,
            device=DEVICE,
        )


async def test_pixels_and_the_seg_are_built_off_the_event_loop_and_no_uid_is_logged(
    archive: DicomWebArchive,
    inference: HttpInferenceClient,
    ct_series: list[Dataset],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decoding a series and building its SEG take seconds of CPU on a large study: they run in
    worker threads, never on the loop that serves the websocket and the other Tasks. The
    study's UIDs stay out of the log."""
    await archive.store(ct_series)
    threads: dict[str, bool] = {}

    def watched(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            threads[name] = threading.current_thread() is threading.main_thread()
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(execution, "volume_from_datasets", watched("volume", volume_from_datasets))
    monkeypatch.setattr(execution, "segmentation_dataset", watched("seg", segmentation_dataset))
    monkeypatch.setattr(execution, "measurement_report", watched("sr", measurement_report))
    study = str(ct_series[0].StudyInstanceUID)
    with structlog.testing.capture_logs() as logged:
        outcome = await infer_study(
            archive,
            inference,
            study_instance_uid=study,
            series_instance_uid=str(ct_series[0].SeriesInstanceUID),
            contract=TISSUE,
            model=REFERENCE_MODEL.name,
            device=DEVICE,
            segmentation=True,
        )
    assert outcome.segmentation_series_uid is not None
    assert outcome.report_series_uid is not None
    assert threads == {"volume": False, "seg": False, "sr": False}  # none on the loop's thread
    text = repr(logged)
    assert logged, "infer_study logs its steps"
    assert study not in text
    assert str(ct_series[0].SeriesInstanceUID) not in text


async def test_no_more_studies_are_decoded_at_once_than_there_are_cores() -> None:
    """Twenty inference jobs at once decode their volumes one per core at a time, not all
    side by side in memory."""
    running, most = 0, 0
    lock = threading.Lock()

    def decode() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    await asyncio.gather(*(execution._off_loop(decode) for _ in range(20)))
    assert 1 <= most <= max(1, os.cpu_count() or 1)


class _HugeSeriesArchive(DicomWebArchive):
    """An archive whose only series has far more slices than the contract takes; retrieving
    it is a test failure."""

    def __init__(self) -> None:
        super().__init__("http://archive.invalid/dicom-web", timeout=1.0)

    async def search_series(self, study_instance_uid: str) -> list[SeriesInfo]:
        return [SeriesInfo("1.2.3.4", "CT", 2000)]

    async def retrieve_series(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> list[Dataset]:
        raise AssertionError("the series was retrieved before the contract check")


class _ReadyModel(HttpInferenceClient):
    def __init__(self) -> None:
        super().__init__("http://model.invalid", timeout=1.0)

    async def ensure_model_ready(self, model: str, version: str | None = None) -> None:
        return None


async def test_a_series_too_long_for_the_contract_is_refused_before_it_is_retrieved() -> None:
    contract = resolve_contract("tissue-composition")
    one_slice = contract.model_copy(
        update={"accepts": contract.accepts.model_copy(update={"max_slices": 1})}
    )
    archive, model = _HugeSeriesArchive(), _ReadyModel()
    try:
        with pytest.raises(
            RequestNotAcceptedError,
            match=r"accepts\.max_slices is 1, the "
            r"series has 2000",
        ):
            await infer_study(
                archive, model, study_instance_uid="1.2.3", contract=one_slice, device=DEVICE
            )
    finally:
        archive.close()
        await model.aclose()


async def test_a_series_past_the_site_slice_limit_is_refused_before_it_is_retrieved() -> None:
    archive, model = _HugeSeriesArchive(), _ReadyModel()
    try:
        with pytest.raises(
            RequestNotAcceptedError,
            match=r"2000 slices, more than the limit of 500 .*\(max_slices\)",
        ):
            await infer_study(
                archive,
                model,
                study_instance_uid="1.2.3",
                contract=TISSUE,
                device=DEVICE,
                max_slices=500,
            )
    finally:
        archive.close()
        await model.aclose()


async def test_series_on_kserve_with_binary_tensors(
    archive: DicomWebArchive, kserve: KServeProcess, ct_series: list[Dataset]
) -> None:
    await archive.store(ct_series)
    async with HttpInferenceClient(kserve.base_url, tensor_encoding="auto") as client:
        outcome = await infer_study(
            archive,
            client,
            study_instance_uid=str(ct_series[0].StudyInstanceUID),
            series_instance_uid=str(ct_series[0].SeriesInstanceUID),
            contract=TISSUE,
            device=DEVICE,
            segmentation=True,
            max_slices=5,
        )
        assert client.binary is True
    assert outcome.slices == 5
    assert outcome.summary()["body-volume"]["value"] > 5 * 0.5 * 56
    assert outcome.segmentation_series_uid is not None


@pytest.mark.parametrize(("max_slices", "max_bytes"), [(4, 1 << 30), (5, 1000)])
async def test_series_past_a_site_limit_is_refused_before_the_model_sees_it(
    archive: DicomWebArchive,
    kserve: KServeProcess,
    ct_series: list[Dataset],
    max_slices: int,
    max_bytes: int,
) -> None:
    # The slice limit is met after QIDO-RS or after retrieval (whether the archive counts the
    # series' instances), the byte limit after conversion: both before anything is sent.
    await archive.store(ct_series)
    wire = _CountingTransport()
    async with HttpInferenceClient(
        kserve.base_url, transport=wire, tensor_encoding="binary", max_request_bytes=max_bytes
    ) as client:
        limit = "max_slices" if max_slices == 4 else "max_request_bytes"
        with pytest.raises(RequestNotAcceptedError, match=rf"limit of .*\({limit}\)"):
            await infer_study(
                archive,
                client,
                study_instance_uid=str(ct_series[0].StudyInstanceUID),
                series_instance_uid=str(ct_series[0].SeriesInstanceUID),
                contract=TISSUE,
                device=DEVICE,
                max_slices=max_slices,
            )
    assert wire.infers == 0


class _CountingTransport(httpx.AsyncHTTPTransport):
    """The real network, counting the requests that reach ``/infer``."""

    infers = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/infer"):
            self.infers += 1
        return await super().handle_async_request(request)
