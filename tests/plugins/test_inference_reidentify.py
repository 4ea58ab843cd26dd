"""Re-identification at the requesting site maps back only what belongs to the request: the
pseudonym mapping holds every study the site ever sent, and a provider (malicious or broken)
that names another study's pseudonyms must not get a result filed under another patient."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, SegmentationStorage

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.omi.contract import resolve_contract
from dsf_bridge.omi.conversion import MEASUREMENT_CODE_SYSTEM, Measurement, volume_from_datasets
from dsf_bridge.omi.dicomweb import DicomWebArchive, StudyNotFoundError
from dsf_bridge.omi.report_sr import measurement_report
from dsf_bridge.omi.segmentation import segmentation_dataset
from dsf_bridge.plugins.inference import CODESYSTEM_OMI, store_result
from dsf_bridge.plugins.registry import SERVICE_FHIR_CLIENT, BpmnError, HandlerContext
from dsf_bridge.plugins.transfer import (
    RESULT_SERIES,
    SERVICE_TRANSFER,
    TransferSite,
    package_datasets,
    publish_package,
)
from dsf_bridge.sandbox.components import OrthancProcess
from dsf_bridge.sandbox.demo import InferenceNetwork
from dsf_bridge.sandbox.refmodel import tissue_labels
from tests.omi.data import load_ct_small, make_series
from tests.plugins.transfer_sites import publish_certificates, transfer_site

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
# Pseudonyms this site handed out earlier: study A went out before, study B now.
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.424242"
OTHER_SERIES = "1.2.826.0.1.3680043.8.498.424243"
PSEUDO_OTHER_STUDY = "2.25.100"
PSEUDO_OTHER_SERIES = "2.25.101"
OTHER_INSTANCE = "1.2.826.0.1.3680043.8.498.424244"
PSEUDO_OTHER_INSTANCE = "2.25.102"
OTHER_FRAME = "1.2.826.0.1.3680043.8.498.424245"
PSEUDO_OTHER_FRAME = "2.25.103"
PSEUDO_STUDY = "2.25.300"
PSEUDO_SERIES = "2.25.200"
PSEUDO_INSTANCE = "2.25.201"


class MemoryPseudonyms:
    """The site's mapping store, in memory (replacement -> original). Every pair belongs to
    the study of the request under test, but those of study A (:data:`OTHER_STUDY`)."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    async def record(self, original_study_uid: str, uids: Mapping[str, str]) -> None:
        self.mapping.update({replaced: original for original, replaced in uids.items()})

    async def originals(self, replaced: list[str], *, study: str | None = None) -> dict[str, str]:
        other = {PSEUDO_OTHER_STUDY, PSEUDO_OTHER_SERIES, PSEUDO_OTHER_INSTANCE, PSEUDO_OTHER_FRAME}
        return {
            uid: self.mapping[uid]
            for uid in replaced
            if uid in self.mapping and (study is None or (uid in other) == (study == OTHER_STUDY))
        }


def _result_task(extra: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "result-1",
        "requester": PROVIDER,
        "inputs": [
            {
                "system": MEASUREMENT_CODE_SYSTEM,
                "code": "muscle-area",
                "value": {"value": 41.5, "unit": "cm2"},
            },
            *extra,
        ],
    }


async def test_a_result_naming_another_studys_series_is_refused(tmp_path: Path) -> None:
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: []}
    ) as network:
        clients: list[FhirClient] = []
        try:
            pseudonyms = MemoryPseudonyms({PSEUDO_OTHER_SERIES: OTHER_SERIES})
            site = transfer_site(network, REQUESTER, clients, pseudonyms)
            task = _result_task(
                [
                    {
                        "system": CODESYSTEM_OMI,
                        "code": "series-instance-uid",
                        "value": PSEUDO_OTHER_SERIES,
                    },
                    {"system": CODESYSTEM_OMI, "code": "slices", "value": 3},
                ]
            )
            ctx = HandlerContext(
                handler="StoreResult",
                element_id="StoreResult",
                business_key="bk-1",
                variables={
                    "task": task,
                    "studyInstanceUid": "1.2.826.0.1.3680043.8.498.1",
                    "startTaskId": "start-1",
                    "modelName": "tissue-composition",
                    "transfer": "dsf",
                    "sentSeriesInstanceUid": PSEUDO_SERIES,
                },
                services={SERVICE_FHIR_CLIENT: site.local, SERVICE_TRANSFER: site},
            )
            with pytest.raises(BpmnError) as refused:
                await store_result(ctx)
            assert refused.value.code == "provider-failed"
            stored = network.resources(REQUESTER, "Bundle")
            assert OTHER_SERIES not in str(stored)
        finally:
            for client in clients:
                await client.aclose()


async def test_a_seg_naming_another_studys_pseudonym_is_not_filed_there(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    """The SEG references the series this site sent but calls itself part of study A (whose
    pseudonym the provider saw in an earlier request): mapped back, it would be stored into
    study A with study B's patient attributes."""
    series = make_series(load_ct_small())[:2]
    for instance in series:
        instance.PatientName = "Patient^B"
        instance.PatientID = "PID-B"
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(series)
    finally:
        archive.close()
    study = str(series[0].StudyInstanceUID)
    seg: Dataset = copy.deepcopy(series[0])
    seg.StudyInstanceUID = PSEUDO_OTHER_STUDY
    seg.SeriesInstanceUID = "2.25.555"
    seg.SOPInstanceUID = "2.25.556"
    seg.file_meta.MediaStorageSOPInstanceUID = UID("2.25.556")
    seg.Modality = "SEG"  # what a result package may hold
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    seg.PatientName = "Pseudonym"
    referenced = Dataset()
    referenced.SeriesInstanceUID = PSEUDO_SERIES
    item = Dataset()
    item.ReferencedSOPClassUID = series[0].SOPClassUID
    item.ReferencedSOPInstanceUID = PSEUDO_INSTANCE
    referenced.ReferencedInstanceSequence = Sequence([item])
    seg.ReferencedSeriesSequence = Sequence([referenced])
    pseudonyms = MemoryPseudonyms(
        {
            PSEUDO_OTHER_STUDY: OTHER_STUDY,
            PSEUDO_STUDY: study,
            PSEUDO_SERIES: str(series[0].SeriesInstanceUID),
            PSEUDO_INSTANCE: str(series[0].SOPInstanceUID),
        }
    )
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "seg.zip"
            package_datasets([seg], package)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, pseudonyms)
            ctx = _package_result_context(site, published.binary_url, study, orthanc)
            with pytest.raises(BpmnError) as refused:
                await store_result(ctx)
            assert refused.value.code == "provider-failed"
            assert "another study" in refused.value.message
        finally:
            for client in clients:
                await client.aclose()
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        with pytest.raises(StudyNotFoundError):
            await archive.search_series(OTHER_STUDY)
    finally:
        archive.close()


@pytest.mark.parametrize(
    "extra",
    [
        {
            "system": CODESYSTEM_OMI,
            "code": "segmentation-package",
            "value": {"reference": "https://dsf.ai-provider.example/fhir/Binary/x1"},
        },
        {
            "system": CODESYSTEM_OMI,
            "code": "segmentation-series-instance-uid",
            "value": "2.25.777",
        },
    ],
    ids=["package", "series"],
)
async def test_a_segmentation_this_site_did_not_ask_for_is_refused(extra: dict[str, Any]) -> None:
    """Nothing goes into the site's archive that it did not ask for: the check comes before
    anything is downloaded or stored."""
    ctx = HandlerContext(
        handler="StoreResult",
        element_id="StoreResult",
        business_key="bk-1",
        variables={
            "task": _result_task([extra]),
            "studyInstanceUid": "1.2.826.0.1.3680043.8.498.1",
            "startTaskId": "start-1",
            "modelName": "tissue-composition",
            "transfer": "dsf",
            "provider": PROVIDER,
            "segmentation": False,
        },
    )
    with pytest.raises(BpmnError) as refused:
        await store_result(ctx)
    assert refused.value.code == "provider-failed"
    assert "did not ask for" in refused.value.message


def _tamper_evidence(report: Dataset) -> None:
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    for series in evidence.ReferencedSeriesSequence:
        if series.SeriesInstanceUID == PSEUDO_SERIES:
            series.SeriesInstanceUID = PSEUDO_OTHER_SERIES


def _tamper_source_series(report: Dataset) -> None:
    items = list(report.ContentSequence)
    while items:
        item = items.pop()
        items.extend(item.get("ContentSequence", []))
        if item.get("ValueType") == "UIDREF" and item.get("UID") == PSEUDO_SERIES:
            item.UID = PSEUDO_OTHER_SERIES


@pytest.mark.parametrize(
    "tamper",
    [None, _tamper_evidence, _tamper_source_series],
    ids=["as-made", "evidence-names-another-series", "source-series-is-another"],
)
async def test_an_sr_from_the_gateway_is_filed_only_when_it_names_the_sent_series(
    tmp_path: Path, orthanc: OrthancProcess, tamper: Callable[[Dataset], None] | None
) -> None:
    """The gateway path brings the SEG's measurement report along: mapped back, it must list
    the sent series and the SEG as its evidence and name the sent series as the source of the
    segmentation; a report naming another study's pseudonyms is refused, SEG and all."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    copies, mapping, seg, report = _seg_and_report(originals)
    if tamper is not None:
        tamper(report)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(originals)
    finally:
        archive.close()
    with OrthancProcess(tmp_path / "gateway").start() as gateway:
        exchange = DicomWebArchive(gateway.dicomweb_url)
        try:
            await exchange.store([*copies, seg, report])
        finally:
            exchange.close()
        await _store_result_from(
            tmp_path, gateway, orthanc, mapping, seg=seg, accepted=tamper is None
        )
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        filed = {s.modality: s for s in await archive.search_series(study)}
        if tamper is not None:
            assert set(filed) == {"CT"}  # neither the SEG nor the SR
            return
        [sr] = await archive.retrieve_series(study, filed["SR"].series_instance_uid)
    finally:
        archive.close()
    assert set(filed) == {"CT", "SEG", "SR"}
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study
    assert {str(s.SeriesInstanceUID) for s in evidence.ReferencedSeriesSequence} == {
        str(originals[0].SeriesInstanceUID),
        filed["SEG"].series_instance_uid,
    }
    assert sr.PatientName == originals[0].PatientName  # the original's, not "Pseudonym"


def _seg_and_report(
    originals: list[Dataset],
) -> tuple[list[Dataset], dict[str, str], Dataset, Dataset]:
    """The pseudonymized copies of ``originals`` as this site sent them, its mapping
    (replacement -> original, with another study's series besides), and the SEG and SR a
    provider makes of the copies."""
    study = str(originals[0].StudyInstanceUID)
    copies: list[Dataset] = []
    mapping = {PSEUDO_STUDY: study, PSEUDO_SERIES: str(originals[0].SeriesInstanceUID)}
    mapping[PSEUDO_OTHER_SERIES] = OTHER_SERIES
    mapping[PSEUDO_OTHER_STUDY] = OTHER_STUDY
    mapping[PSEUDO_OTHER_INSTANCE] = OTHER_INSTANCE
    mapping[PSEUDO_OTHER_FRAME] = OTHER_FRAME
    for index, original in enumerate(originals):
        pseudonymized = copy.deepcopy(original)
        pseudonymized.StudyInstanceUID = PSEUDO_STUDY
        pseudonymized.SeriesInstanceUID = PSEUDO_SERIES
        pseudonymized.SOPInstanceUID = f"2.25.40{index}"
        pseudonymized.file_meta.MediaStorageSOPInstanceUID = UID(f"2.25.40{index}")
        pseudonymized.PatientName = "Pseudonym"
        mapping[f"2.25.40{index}"] = str(original.SOPInstanceUID)
        copies.append(pseudonymized)
    contract = resolve_contract("tissue-composition")
    volume = volume_from_datasets(copies, contract)
    seg = segmentation_dataset(
        volume,
        copies,
        tissue_labels(volume.pixels),
        algorithm_name="tissue-composition",
        segments=contract.outputs.label_maps[0].segments,
    )
    found = [
        Measurement(code=m.code, value=1.0, unit=m.unit) for m in contract.outputs.measurements
    ]
    report = measurement_report(
        seg, copies, found, contract, algorithm_name="tissue-composition", algorithm_version="1"
    )
    assert report is not None
    return copies, mapping, seg, report


def _tamper_evidence_study(report: Dataset) -> None:
    report.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID = PSEUDO_OTHER_STUDY


def _tamper_seg_instance(report: Dataset) -> None:
    """The evidence lists, in the SEG's series, another instance besides the SEG (one of
    another study, mapped back)."""
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    for series in evidence.ReferencedSeriesSequence:
        if series.SeriesInstanceUID != PSEUDO_SERIES:
            other = copy.deepcopy(series.ReferencedSOPSequence[0])
            other.ReferencedSOPInstanceUID = PSEUDO_OTHER_SERIES
            series.ReferencedSOPSequence.append(other)


def _tamper_evidence_without_content(report: Dataset) -> None:
    """An SR without a ContentSequence (no measurement at all) whose evidence names another
    study's series: its evidence must be checked all the same."""
    del report.ContentSequence
    _tamper_evidence(report)


@pytest.mark.parametrize(
    "tamper",
    [
        None,
        _tamper_evidence_study,
        _tamper_evidence,
        _tamper_seg_instance,
        _tamper_source_series,
        _tamper_evidence_without_content,
    ],
    ids=[
        "as-made",
        "evidence-in-another-study",
        "evidence-names-another-series",
        "evidence-names-another-instance",
        "source-series-is-another",
        "no-content-evidence-names-another-series",
    ],
)
async def test_an_sr_in_the_result_package_is_filed_only_when_it_names_the_sent_series(
    tmp_path: Path, orthanc: OrthancProcess, tamper: Callable[[Dataset], None] | None
) -> None:
    """Through DSF the SEG and its SR come back in one package of two series: mapped back,
    the SR is stored with the SEG under the original study and patient, referencing the
    original series and the SEG; an SR naming another study's pseudonyms is refused, SEG and
    all, and nothing is stored."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    _, mapping, seg, report = _seg_and_report(originals)
    if tamper is not None:
        tamper(report)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(originals)
    finally:
        archive.close()
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "result.zip"
            package_datasets([seg, report], package, max_series=RESULT_SERIES)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            ctx = _package_result_context(site, published.binary_url, study, orthanc)
            if tamper is None:
                await store_result(ctx)
            else:
                with pytest.raises(BpmnError) as refused:
                    await store_result(ctx)
                assert refused.value.code == "provider-failed"
                assert "was not stored" in refused.value.message
        finally:
            for client in clients:
                await client.aclose()
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        filed = {s.modality: s for s in await archive.search_series(study)}
        if tamper is not None:
            assert set(filed) == {"CT"}  # neither the SEG nor the SR
            with pytest.raises(StudyNotFoundError):
                await archive.search_series(OTHER_STUDY)
            return
        [stored_seg] = await archive.retrieve_series(study, filed["SEG"].series_instance_uid)
        [sr] = await archive.retrieve_series(study, filed["SR"].series_instance_uid)
    finally:
        archive.close()
    assert set(filed) == {"CT", "SEG", "SR"}
    assert sr.StudyInstanceUID == study
    assert sr.PatientName == originals[0].PatientName  # the original's, not "Pseudonym"
    assert sr.PatientID == originals[0].PatientID
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study
    assert {str(s.SeriesInstanceUID) for s in evidence.ReferencedSeriesSequence} == {
        str(originals[0].SeriesInstanceUID),
        str(stored_seg.SeriesInstanceUID),
    }
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(groups, hd.sr.MeasurementReport)
    for group in groups.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment is not None
        [segment_reference, source] = group.referenced_segment
        assert segment_reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            stored_seg.SOPInstanceUID
        )
        assert str(source.UID) == str(originals[0].SeriesInstanceUID)


async def test_a_result_package_with_another_series_than_the_seg_and_sr_is_refused(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    """A result package of the SEG and a CT series (the provider's copy of the images, or
    another series): nothing but a SEG and its SR is stored into this site's archive."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    copies, mapping, seg, _ = _seg_and_report(originals)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(originals)
    finally:
        archive.close()
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "result.zip"
            package_datasets([seg, copies[0]], package, max_series=RESULT_SERIES)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            ctx = _package_result_context(site, published.binary_url, study, orthanc)
            with pytest.raises(BpmnError) as refused:
                await store_result(ctx)
        finally:
            for client in clients:
                await client.aclose()
    assert refused.value.code == "provider-failed"
    assert "modalities ['CT', 'SEG']" in refused.value.message
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        assert [s.modality for s in await archive.search_series(study)] == ["CT"]
    finally:
        archive.close()


def _package_result_context(
    site: TransferSite, package: str, study: str, orthanc: OrthancProcess
) -> HandlerContext:
    """StoreResult's context for a result Task naming the segmentation ``package``."""
    task = _result_task(
        [
            {
                "system": CODESYSTEM_OMI,
                "code": "segmentation-package",
                "value": {"reference": package, "type": "Binary"},
            }
        ]
    )
    return HandlerContext(
        handler="StoreResult",
        element_id="StoreResult",
        business_key="bk-1",
        variables={
            "task": task,
            "studyInstanceUid": study,
            "startTaskId": "start-1",
            "modelName": "tissue-composition",
            "transfer": "dsf",
            "sentSeriesInstanceUid": PSEUDO_SERIES,
            "dicomwebEndpoint": orthanc.dicomweb_url,
            "provider": PROVIDER,
            "segmentation": True,
        },
        services={SERVICE_FHIR_CLIENT: site.local, SERVICE_TRANSFER: site},
    )


async def test_a_segmentation_series_that_is_the_sent_images_is_refused(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    """The result names the pseudonymized CT series in the gateway as its segmentation:
    mapped back, it would be stored into this site's archive as if it were a result."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    copies, mapping, _, _ = _seg_and_report(originals)
    with OrthancProcess(tmp_path / "gateway").start() as gateway:
        exchange = DicomWebArchive(gateway.dicomweb_url)
        try:
            await exchange.store(copies)
        finally:
            exchange.close()
        await _store_result_from(
            tmp_path,
            gateway,
            orthanc,
            mapping,
            seg=copies[0],
            accepted=False,
            refusal="holds a CT instance",
        )
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        with pytest.raises(StudyNotFoundError):
            await archive.search_series(study)
    finally:
        archive.close()


async def _store_result_from(
    tmp_path: Path,
    gateway: OrthancProcess,
    orthanc: OrthancProcess,
    mapping: dict[str, str],
    *,
    seg: Dataset,
    accepted: bool,
    refusal: str = "another series",
) -> None:
    """StoreResult of a result Task naming ``seg``'s series in ``gateway``: it succeeds when
    ``accepted``, else fails ``provider-failed`` with ``refusal`` in its message."""
    study = mapping[PSEUDO_STUDY]
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: []}
    ) as network:
        clients: list[FhirClient] = []
        try:
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            task = _result_task(
                [
                    {
                        "system": CODESYSTEM_OMI,
                        "code": "segmentation-series-instance-uid",
                        "value": str(seg.SeriesInstanceUID),
                    }
                ]
            )
            ctx = HandlerContext(
                handler="StoreResult",
                element_id="StoreResult",
                business_key="bk-1",
                variables={
                    "task": task,
                    "studyInstanceUid": study,
                    "startTaskId": "start-1",
                    "modelName": "tissue-composition",
                    "transfer": "dicomweb",
                    "dicomwebGateway": gateway.dicomweb_url,
                    "dicomwebEndpoint": orthanc.dicomweb_url,
                    "sentStudyInstanceUid": PSEUDO_STUDY,
                    "sentSeriesInstanceUid": PSEUDO_SERIES,
                    "provider": PROVIDER,
                    "segmentation": True,
                },
                services={SERVICE_FHIR_CLIENT: site.local, SERVICE_TRANSFER: site},
            )
            if accepted:
                await store_result(ctx)
            else:
                with pytest.raises(BpmnError) as refused:
                    await store_result(ctx)
                assert refused.value.code == "provider-failed"
                assert refusal in refused.value.message
        finally:
            for client in clients:
                await client.aclose()


@pytest.mark.parametrize(
    "own",
    [(PSEUDO_SERIES, "2.25.400"), (PSEUDO_OTHER_SERIES, "2.25.556")],
    ids=["the-sent-series-and-instance", "another-studys-series"],
)
async def test_a_seg_taking_a_sent_uid_as_its_own_is_refused(
    tmp_path: Path, orthanc: OrthancProcess, own: tuple[str, str]
) -> None:
    """A SEG whose own Series (and SOP) Instance UID is a pseudonym this site handed out:
    mapped back, it would be stored as an instance of the sent CT series (under the UID of one
    of its images) or into a series of another patient's study. A result's own UIDs are new."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    _, mapping, seg, _ = _seg_and_report(originals)
    seg.SeriesInstanceUID, seg.SOPInstanceUID = own
    seg.file_meta.MediaStorageSOPInstanceUID = UID(own[1])
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(originals)
    finally:
        archive.close()
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "result.zip"
            package_datasets([seg], package, max_series=RESULT_SERIES)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            ctx = _package_result_context(site, published.binary_url, study, orthanc)
            with pytest.raises(BpmnError) as refused:
                await store_result(ctx)
        finally:
            for client in clients:
                await client.aclose()
    assert refused.value.code == "provider-failed"
    assert "was not stored" in refused.value.message
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        [series] = await archive.search_series(study)
        assert series.modality == "CT"
        assert series.instance_count == 2
        stored = await archive.retrieve_series(study, series.series_instance_uid)
        assert {str(ds.Modality) for ds in stored} == {"CT"}
    finally:
        archive.close()


@pytest.mark.parametrize("problem", ["too-large", "gone"])
async def test_a_result_package_that_cannot_be_downloaded_fails_with_a_reason(
    tmp_path: Path, orthanc: OrthancProcess, problem: str
) -> None:
    """A result package over this site's limit, or no longer on the provider's server (a
    404): the provider failed, said as a BPMN error with the reason, not an exception that
    ends the instance untranslated."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    _, mapping, seg, report = _seg_and_report(originals)
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "result.zip"
            package_datasets([seg, report], package, max_series=RESULT_SERIES)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            url = published.binary_url
            if problem == "too-large":
                site.max_bytes = 1024
            else:
                url = url.rsplit("/", 1)[0] + "/no-such-package"
            ctx = _package_result_context(site, url, study, orthanc)
            with pytest.raises(BpmnError) as refused:
                await store_result(ctx)
        finally:
            for client in clients:
                await client.aclose()
    assert refused.value.code == "provider-failed"
    assert "segmentation package from AI_Provider" in refused.value.message
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        with pytest.raises(StudyNotFoundError):
            await archive.search_series(study)
    finally:
        archive.close()


def _seg_references_another_instance(seg: Dataset, report: Dataset) -> None:
    """The SEG lists, under the sent series, an image of another study among its sources."""
    [referenced] = seg.ReferencedSeriesSequence
    other = copy.deepcopy(referenced.ReferencedInstanceSequence[0])
    other.ReferencedSOPInstanceUID = PSEUDO_OTHER_INSTANCE
    referenced.ReferencedInstanceSequence.append(other)


def _sr_evidence_names_another_instance(seg: Dataset, report: Dataset) -> None:
    """The SR's evidence lists, under the sent series, an image of another study."""
    for series in report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
        if series.SeriesInstanceUID == PSEUDO_SERIES:
            other = copy.deepcopy(series.ReferencedSOPSequence[0])
            other.ReferencedSOPInstanceUID = PSEUDO_OTHER_INSTANCE
            series.ReferencedSOPSequence.append(other)


def _seg_derived_from_another_instance(seg: Dataset, report: Dataset) -> None:
    """A frame of the SEG says it was derived from an image of another study."""
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    source = frame.DerivationImageSequence[0].SourceImageSequence[0]
    source.ReferencedSOPInstanceUID = PSEUDO_OTHER_INSTANCE


def _seg_in_another_frame_of_reference(seg: Dataset, report: Dataset) -> None:
    """The SEG says its frame of reference is another study's (a viewer would register it
    with that study's images)."""
    seg.FrameOfReferenceUID = PSEUDO_OTHER_FRAME


@pytest.mark.parametrize(
    "tamper",
    [
        _seg_references_another_instance,
        _sr_evidence_names_another_instance,
        _seg_derived_from_another_instance,
        _seg_in_another_frame_of_reference,
    ],
    ids=["seg-source-instances", "sr-evidence", "seg-derivation", "seg-frame-of-reference"],
)
async def test_a_result_referencing_an_image_of_another_study_is_refused(
    tmp_path: Path,
    orthanc: OrthancProcess,
    tamper: Callable[[Dataset, Dataset], None],
) -> None:
    """The series is the sent one, but an instance referenced in it is a pseudonym of another
    study's image (the provider saw it in an earlier request): mapped back, the SEG or SR this
    site stores would reference another patient's image. Every study, series and SOP instance
    a result references, once mapped back, belongs to the request's study."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    _, mapping, seg, report = _seg_and_report(originals)
    tamper(seg, report)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(originals)
    finally:
        archive.close()
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "result.zip"
            package_datasets([seg, report], package, max_series=RESULT_SERIES)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            ctx = _package_result_context(site, published.binary_url, study, orthanc)
            with pytest.raises(BpmnError) as refused:
                await store_result(ctx)
        finally:
            for client in clients:
                await client.aclose()
    assert refused.value.code == "provider-failed"
    assert "was not stored" in refused.value.message
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        assert [s.modality for s in await archive.search_series(study)] == ["CT"]
    finally:
        archive.close()


async def test_an_image_that_calls_itself_a_seg_is_refused(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    """A CT image (the SOP class of an image: pixels of a study the provider once received)
    with Modality SEG, new UIDs and a reference to the sent series: only a Segmentation and an
    SR come back, by SOP class, not by the Modality the provider wrote."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    copies, mapping, _, _ = _seg_and_report(originals)
    image = copy.deepcopy(copies[1])
    image.Modality = "SEG"
    image.SeriesInstanceUID = "2.25.777"
    image.SOPInstanceUID = "2.25.778"
    image.file_meta.MediaStorageSOPInstanceUID = UID("2.25.778")
    referenced = Dataset()
    referenced.SeriesInstanceUID = PSEUDO_SERIES
    item = Dataset()
    item.ReferencedSOPClassUID = copies[0].SOPClassUID
    item.ReferencedSOPInstanceUID = copies[0].SOPInstanceUID
    referenced.ReferencedInstanceSequence = Sequence([item])
    image.ReferencedSeriesSequence = Sequence([referenced])
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(originals)
    finally:
        archive.close()
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "result.zip"
            package_datasets([image], package, max_series=RESULT_SERIES)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            ctx = _package_result_context(site, published.binary_url, study, orthanc)
            with pytest.raises(BpmnError) as refused:
                await store_result(ctx)
        finally:
            for client in clients:
                await client.aclose()
    assert refused.value.code == "provider-failed"
    assert "nothing was stored" in refused.value.message
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        assert [s.modality for s in await archive.search_series(study)] == ["CT"]
    finally:
        archive.close()


async def test_private_attributes_of_a_result_are_not_stored(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    """A SEG with a private block: a UID of another study this site sent (mapped back like
    every UID, and named by no keyword a check could look at) and a blob. This site asked for
    a segmentation and its report; the provider's private data is not stored with them."""
    originals = make_series(load_ct_small(), slices=2)
    study = str(originals[0].StudyInstanceUID)
    _, mapping, seg, report = _seg_and_report(originals)
    block = seg.private_block(0x0099, "SOME PROVIDER", create=True)
    block.add_new(0x01, "UI", PSEUDO_OTHER_SERIES)
    block.add_new(0x02, "OB", b"\x00" * 64)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(originals)
    finally:
        archive.close()
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            provider = transfer_site(network, PROVIDER, clients)
            package = tmp_path / "result.zip"
            package_datasets([seg, report], package, max_series=RESULT_SERIES)
            published = await publish_package(
                provider, package, recipient=REQUESTER, transfer_id="bk/seg", title="test"
            )
            site = transfer_site(network, REQUESTER, clients, MemoryPseudonyms(mapping))
            await store_result(_package_result_context(site, published.binary_url, study, orthanc))
        finally:
            for client in clients:
                await client.aclose()
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        filed = {s.modality: s for s in await archive.search_series(study)}
        [stored] = await archive.retrieve_series(study, filed["SEG"].series_instance_uid)
    finally:
        archive.close()
    assert not [element.tag for element in stored if element.tag.is_private]
    assert OTHER_SERIES not in str(stored)
