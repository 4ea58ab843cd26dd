"""Re-identification at the requesting site maps back only what belongs to the request: the
pseudonym mapping holds every study the site ever sent, and a provider (malicious or broken)
that names another study's pseudonyms must not get a result filed under another patient."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.omi.conversion import MEASUREMENT_CODE_SYSTEM
from dsf_bridge.omi.dicomweb import DicomWebArchive, StudyNotFoundError
from dsf_bridge.plugins.inference import CODESYSTEM_OMI, store_result
from dsf_bridge.plugins.registry import SERVICE_FHIR_CLIENT, BpmnError, HandlerContext
from dsf_bridge.plugins.transfer import (
    SERVICE_TRANSFER,
    package_datasets,
    publish_package,
)
from dsf_bridge.sandbox.components import OrthancProcess
from dsf_bridge.sandbox.demo import InferenceNetwork
from tests.omi.data import load_ct_small, make_series
from tests.plugins.transfer_sites import publish_certificates, transfer_site

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
# Pseudonyms this site handed out earlier: study A went out before, study B now.
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.424242"
OTHER_SERIES = "1.2.826.0.1.3680043.8.498.424243"
PSEUDO_OTHER_STUDY = "2.25.100"
PSEUDO_OTHER_SERIES = "2.25.101"
PSEUDO_STUDY = "2.25.300"
PSEUDO_SERIES = "2.25.200"
PSEUDO_INSTANCE = "2.25.201"


class MemoryPseudonyms:
    """The site's mapping store, in memory (replacement -> original)."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    async def record(self, original_study_uid: str, uids: Mapping[str, str]) -> None:
        self.mapping.update({replaced: original for original, replaced in uids.items()})

    async def originals(self, replaced: list[str]) -> dict[str, str]:
        return {uid: self.mapping[uid] for uid in replaced if uid in self.mapping}


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
            task = _result_task(
                [
                    {
                        "system": CODESYSTEM_OMI,
                        "code": "segmentation-package",
                        "value": {"reference": published.binary_url, "type": "Binary"},
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
                    "transfer": "dsf",
                    "sentSeriesInstanceUid": PSEUDO_SERIES,
                    "dicomwebEndpoint": orthanc.dicomweb_url,
                    "provider": PROVIDER,
                    "segmentation": True,
                },
                services={SERVICE_FHIR_CLIENT: site.local, SERVICE_TRANSFER: site},
            )
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
