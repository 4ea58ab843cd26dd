"""Issue 13 end to end: studies cross sites pseudonymized, encrypted, through the DSF FHIR
servers (sandbox sites, real bridges, real Orthanc and MLServer).

What the provider received is read where its bridge opens the package (a spy around
``open_package``, which changes nothing of the flow): every attribute of every instance is
checked against DICOM PS3.15 Table E.1-1 as the ``dicom-anonymizer`` package ships it, and
against every UID and identifying value of the originals.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.errors import RemoteError
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.pseudonymize import DESCRIPTORS, DEVICE_IDENTITY
from dsf_bridge.plugins import inference, transfer
from dsf_bridge.plugins.inference import CODESYSTEM_OMI, result_summary
from dsf_bridge.plugins.transfer import (
    TransferSite,
    package_datasets,
    publish_package,
    receive_package,
)
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.demo import InferenceNetwork
from tests.components import REFERENCE_MODEL
from tests.omi.data import load_ct_small, make_series
from tests.plugins.transfer_sites import publish_certificates, transfer_site

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
THIRD = "Other_Clinic"
SERVICE = "tissue-composition"

# What a real study of a patient carries, set on every instance of the test series.
IDENTITY = {
    "PatientName": "Mustermann^Erika^Maria",
    "PatientID": "PID-4711-0815",
    "PatientBirthDate": "19640812",
    "OtherPatientIDs": "KIS-99887766",
    "AccessionNumber": "ACC20260412001",
    "InstitutionName": "Universitaetsklinikum Musterstadt",
    "InstitutionAddress": "Musterweg 1, 12345 Musterstadt",
    "ReferringPhysicianName": "Doktor^Hans",
    "OperatorsName": "Technik^Tina",
    "StudyID": "S-2026-0412",
    "StudyDate": "20260412",
    "SeriesDate": "20260412",
    "StudyDescription": "CT Abdomen Mustermann",
}


# What the options of docs/privacy.md keep of what the basic profile would remove.
OPTIONS_KEEP = DEVICE_IDENTITY | DESCRIPTORS


def _identifying_series() -> list[Dataset]:
    """A five-slice CT series whose instances carry a patient's identity, a private
    attribute and an institution, as a hospital archive holds them."""
    series = make_series(load_ct_small())
    for instance in series:
        for keyword, value in IDENTITY.items():
            setattr(instance, keyword, value)
        block = instance.private_block(0x0029, "ACME HOSPITAL", create=True)
        block.add_new(0x10, "LO", "private note about Erika Mustermann")
    return series


def _profile() -> dict[BaseTag, str]:
    """Table E.1-1 of PS3.15 as dicom-anonymizer ships it: tag -> the action codes."""
    actions: dict[BaseTag, str] = {}
    for name in dir(table):
        if not name.endswith("_TAGS"):
            continue
        code = name.removesuffix("_TAGS")
        for row in getattr(table, name):
            if len(row) == 2:
                actions[Tag(row[0], row[1])] = code
    return actions


def _elements(dataset: Dataset) -> Iterator[Any]:
    for element in dataset:
        yield element
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _elements(item)


def _uids(dataset: Dataset) -> set[str]:
    found: set[str] = set()
    for element in _elements(dataset):
        if element.VR == "UI" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            found.update(str(v) for v in values)
    return {uid for uid in found if not uid.startswith("1.2.840.10008.")}


def _texts(dataset: Dataset) -> str:
    parts = []
    for element in _elements(dataset):
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            continue
        parts.append(str(element.value))
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        parts.extend(str(e.value) for e in meta)
    return "\n".join(parts)


def _spy_on_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, list[Dataset]]:
    """The datasets each organization's bridge read from a package it received."""
    received: dict[str, list[Dataset]] = {}
    original = transfer.open_package

    def spy(
        site: TransferSite, path: Path, *, max_series: int = 1
    ) -> tuple[Any, Callable[[], list[Dataset]]]:
        manifest, load = original(site, path, max_series=max_series)

        def recorded() -> list[Dataset]:
            datasets = load()
            received.setdefault(site.local_organization, []).extend(datasets)
            return datasets

        return manifest, recorded

    monkeypatch.setattr(inference, "open_package", spy)  # where the handlers look it up
    return received


async def _store(orthanc: OrthancProcess, datasets: list[Dataset]) -> None:
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(datasets)
    finally:
        archive.close()


def _bridges(mlserver: MLServerProcess) -> dict[str, Any]:
    return {
        REQUESTER: {"catalogue": [{"id": SERVICE, "organization": PROVIDER}]},
        PROVIDER: {
            "catalogue": [
                {
                    "id": SERVICE,
                    "model_name": REFERENCE_MODEL.name,
                    "inference_url": mlserver.base_url,
                }
            ]
        },
    }


async def test_the_provider_gets_a_pseudonymized_copy_and_the_seg_comes_back_to_the_original(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    series = _identifying_series()
    await _store(orthanc, series)
    study = str(series[0].StudyInstanceUID)
    received = _spy_on_packages(monkeypatch)
    async with InferenceNetwork(tmp_path / "sites", _bridges(mlserver)) as network:
        task_id = await network.request(
            REQUESTER,
            study_instance_uid=study,
            dicomweb_endpoint=orthanc.dicomweb_url,
            service=SERVICE,
            segmentation=True,
        )
        finished = await network.finished(REQUESTER, [task_id], 60)
        await network.settled()
        start = finished[task_id]
        assert start["status"] == "completed", start.get("output")
        assert result_summary(start)["muscle-volume"]["value"] > 0
        crossed = {
            o["type"]["coding"][0]["code"]: next(v for k, v in o.items() if k.startswith("value"))
            for o in start["output"]
            if o["type"]["coding"][0]["system"] == CODESYSTEM_OMI
        }
        assert crossed["study-package-bytes"] > sum(len(s.PixelData) for s in series)

        # Both packages are gone: the study's after the result, the SEG's after the receipt.
        for organization in (REQUESTER, PROVIDER):
            assert network.resources(organization, "Binary") == [], organization
            assert network.resources(organization, "DocumentReference") == [], organization
        provider_tasks = network.tasks(PROVIDER)
        assert {t["input"][0]["valueString"] for t in provider_tasks} == {
            "inferenceRequest",
            "inferenceReceipt",
        }
        assert all(t["status"] == "completed" for t in provider_tasks), [
            (t["input"][0]["valueString"], t["status"], t.get("output")) for t in provider_tasks
        ]
        # What crossed between the sites (the start Task is local and names the study).
        crossed_tasks = [
            t
            for t in [*network.tasks(REQUESTER), *provider_tasks]
            if t["input"][0]["valueString"] != "startInferenceRequest"
        ]
        assert len(crossed_tasks) == 3
        wire = json.dumps(crossed_tasks)

    originals = {str(s.SOPInstanceUID): s for s in series}
    original_uids = set().union(*(_uids(s) for s in series))
    identifying = [*IDENTITY.values(), "Erika", "Mustermann", "ACME HOSPITAL"]
    for uid in original_uids:
        assert uid not in wire, "an original UID crossed in a Task"

    copies = received[PROVIDER]
    assert len(copies) == len(series)
    profile = _profile()
    for copy in copies:
        text = _texts(copy)
        for value in identifying:
            assert value not in text, f"{value!r} left the site"
        for uid in original_uids:
            assert uid not in text, "an original UID left the site"
        assert copy.PatientIdentityRemoved == "YES"
        # Which original it is: the instance number survives (the profile keeps it).
        [original] = [o for o in originals.values() if o.InstanceNumber == copy.InstanceNumber]
        for element in original:
            tag = element.tag
            if tag.is_private:
                assert tag not in copy, f"private {tag} left the site"
                continue
            action = profile.get(tag)
            if action is None or element.VR == "SQ" or not element.value:
                continue
            if tag in OPTIONS_KEEP:
                continue  # Retain Device Identity, Clean Descriptors (scanned above)
            if element.VR in ("DA", "DT"):
                # Retain Longitudinal Temporal Information, Modified Dates: shifted, not kept.
                assert tag not in copy or copy[tag].value != element.value, element.keyword
                continue
            if element.VR == "TM":
                continue  # times of day are kept with the shifted dates (docs/privacy.md)
            if action in ("X", "X_Z", "X_Z_D", "Z", "Z_D"):
                assert tag not in copy or not copy[tag].value, f"{element.keyword} ({action})"
            elif action in ("D", "X_D", "U", "X_Z_U_STAR"):
                assert tag not in copy or copy[tag].value != element.value, (
                    f"{element.keyword} ({action}) kept its original value"
                )
        assert copy.StudyDate != original.StudyDate  # dates shifted (the default)
        assert dt.datetime.strptime(copy.StudyDate, "%Y%m%d") < dt.datetime(2026, 4, 12)

    # The SEG and its measurement report came back in one package, were mapped back and
    # stored next to the original series.
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        found = await archive.search_series(study)
        [seg_series] = [s for s in found if s.modality == "SEG"]
        [seg] = await archive.retrieve_series(study, seg_series.series_instance_uid)
        [sr_series] = [s for s in found if s.modality == "SR"]
        [sr] = await archive.retrieve_series(study, sr_series.series_instance_uid)
    finally:
        archive.close()
    assert sorted(str(s.modality) for s in found) == ["CT", "SEG", "SR"]
    assert sorted(str(d.Modality) for d in received[REQUESTER]) == ["SEG", "SR"]
    assert seg.StudyInstanceUID == study
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= set(
        originals
    )
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    # ... and names the patient and study again, as the archive holds them.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate"):
        assert str(seg.get(keyword)) == IDENTITY[keyword], keyword
    assert "PatientIdentityRemoved" not in seg
    _assert_report_mapped_back(sr, seg, series, copies)


def _assert_report_mapped_back(
    sr: Dataset, seg: Dataset, series: list[Dataset], copies: list[Dataset]
) -> None:
    """The SR names the original study, patient and series and the SEG as stored; no pseudonym
    of ``copies`` stayed in it, and highdicom reads it as a TID 1500 report whose groups
    reference the SEG's segments and the original series."""
    study = str(series[0].StudyInstanceUID)
    assert sr.StudyInstanceUID == study
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate"):
        assert str(sr.get(keyword)) == IDENTITY[keyword], keyword
    assert "PatientIdentityRemoved" not in sr
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study
    assert {str(s.SeriesInstanceUID) for s in evidence.ReferencedSeriesSequence} == {
        str(series[0].SeriesInstanceUID),
        str(seg.SeriesInstanceUID),
    }
    copied_uids = set().union(*(_uids(c) for c in copies))
    assert not copied_uids & _uids(sr), "a pseudonym stayed in the SR"
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert {str(g.tracking_identifier) for g in groups} == {
        str(item.SegmentLabel) for item in seg.SegmentSequence
    }
    for group in groups:
        assert group.referenced_segment is not None
        assert group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            seg.SOPInstanceUID
        )
        assert str(group.referenced_segment[1].UID) == str(series[0].SeriesInstanceUID)


async def test_a_study_with_burned_in_annotation_never_leaves(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
) -> None:
    series = _identifying_series()
    for instance in series:
        instance.BurnedInAnnotation = "YES"
    await _store(orthanc, series)
    async with InferenceNetwork(tmp_path / "sites", _bridges(mlserver)) as network:
        task_id = await network.request(
            REQUESTER,
            study_instance_uid=str(series[0].StudyInstanceUID),
            dicomweb_endpoint=orthanc.dicomweb_url,
            service=SERVICE,
        )
        finished = await network.finished(REQUESTER, [task_id], 30)
        await network.settled()
        start = finished[task_id]
        assert start["status"] == "failed"
        [error] = [o["valueString"] for o in start["output"] if "valueString" in o]
        assert "request-invalid" in error
        assert "BurnedInAnnotation=YES" in error
        # Nothing was stored for the provider, and no request reached it.
        assert network.resources(REQUESTER, "Binary") == []
        assert network.tasks(PROVIDER) == []


async def test_only_the_recipient_reads_a_package(tmp_path: Path) -> None:
    """A package stored for AI_Provider on Hospital_A's server: AI_Provider downloads and
    decrypts it; Other_Clinic, in the same network and allow list, gets 403 or 404."""
    series = _identifying_series()[:2]
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: [], THIRD: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER, THIRD)
        clients: list[FhirClient] = []
        try:
            sender = transfer_site(network, REQUESTER, clients)
            package = tmp_path / "package.zip"
            package_datasets(series, package)
            published = await publish_package(
                sender, package, recipient=PROVIDER, transfer_id="t-1", title="test"
            )
            third = transfer_site(network, THIRD, clients)
            remote = await third.client_of(REQUESTER)
            with pytest.raises(RemoteError) as refused:
                await remote.download_binary(
                    published.binary_url, lambda chunk: None, max_bytes=1 << 30
                )
            assert refused.value.status in (403, 404)
            recipient = transfer_site(network, PROVIDER, clients)
            got = await receive_package(
                recipient, published.binary_url, sender=REQUESTER, target=tmp_path / "got.zip"
            )
            assert got.path.read_bytes() == package.read_bytes()
        finally:
            for client in clients:
                await client.aclose()


async def test_through_a_dicomweb_gateway_the_copy_is_the_same_pseudonymized_one(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
) -> None:
    """``transfer = "dicomweb"`` with a ``dicomweb_gateway``: the pseudonymized copy goes into
    the gateway (a second Orthanc), the provider fetches it there by its replacement UIDs and
    stores the SEG there; the requester maps the SEG back into its own archive."""
    series = _identifying_series()
    await _store(orthanc, series)
    study = str(series[0].StudyInstanceUID)
    with OrthancProcess(tmp_path / "gateway").start() as gateway:
        bridges = _bridges(mlserver)
        bridges[REQUESTER] = {
            "catalogue": [
                {
                    "id": SERVICE,
                    "organization": PROVIDER,
                    "transfer": "dicomweb",
                    "dicomweb_gateway": gateway.dicomweb_url,
                }
            ]
        }
        async with InferenceNetwork(tmp_path / "sites", bridges) as network:
            task_id = await network.request(
                REQUESTER,
                study_instance_uid=study,
                dicomweb_endpoint=orthanc.dicomweb_url,
                service=SERVICE,
                segmentation=True,
            )
            finished = await network.finished(REQUESTER, [task_id], 60)
            await network.settled()
            assert finished[task_id]["status"] == "completed", finished[task_id].get("output")
            [request] = network.tasks(PROVIDER)
            inputs = {
                i["type"]["coding"][0]["code"]: i.get("valueString") for i in request["input"]
            }
            assert inputs["dicomweb-endpoint"] == gateway.dicomweb_url
            copied_study = inputs["study-instance-uid"]
            assert copied_study != study
            # No package: nothing on either DSF FHIR server.
            assert network.resources(REQUESTER, "Binary") == []
        exchange = DicomWebArchive(gateway.dicomweb_url)
        try:
            found = await exchange.search_series(copied_study)
            [copy_series] = [s for s in found if s.modality == "CT"]
            copies = await exchange.retrieve_series(copied_study, copy_series.series_instance_uid)
        finally:
            exchange.close()
    original_uids = set().union(*(_uids(s) for s in series))
    assert len(copies) == len(series)
    for copy in copies:
        text = _texts(copy)
        assert copy.PatientIdentityRemoved == "YES"
        for value in (*IDENTITY.values(), "Erika", "Mustermann"):
            assert value not in text
        assert not original_uids & _uids(copy)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        found = await archive.search_series(study)
        [seg_series] = [s for s in found if s.modality == "SEG"]
        [seg] = await archive.retrieve_series(study, seg_series.series_instance_uid)
        [sr_series] = [s for s in found if s.modality == "SR"]
        [sr] = await archive.retrieve_series(study, sr_series.series_instance_uid)
    finally:
        archive.close()
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    assert seg.PatientID == IDENTITY["PatientID"]
    # The measurement report came along from the gateway, mapped back like the SEG: it refers
    # to the original series and to the SEG, and names the patient again.
    _assert_report_mapped_back(sr, seg, series, copies)
