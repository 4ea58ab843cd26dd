"""The OMI registry between two sandbox sites: the provider publishes its service and a
heartbeat measured on real MLServer; the requester, without a catalogue, finds it by what it
accepts and asks for it by the registry's id, then by what it needs (the bridge searches and
chooses, reading the contract from the registry); the provider takes the requests under its
own catalogue id."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset

from dsf_bridge.omi.contract import resolve_contract
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.omi.publish import RegistryPublisher, ServiceOffer, measure_heartbeat
from dsf_bridge.omi.registry import FhirRegistryClient, ServiceQuery
from dsf_bridge.plugins.inference import SERVICE_OMI_REGISTRY, result_summary
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.demo import InferenceNetwork
from tests.components import REFERENCE_MODEL
from tests.omi.fhir_registry import FhirRegistry
from tests.plugins.test_inference import CT_SMALL_AREAS, PROVIDER, REQUESTER, studies

__all__ = ["studies"]


async def test_a_published_service_is_found_and_runs(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
    studies: tuple[Dataset, list[Dataset]],
) -> None:
    ct_small, _ = studies
    registry = FhirRegistry()
    client = FhirRegistryClient(
        "http://registry.test/fhir", transport=httpx.ASGITransport(app=registry.app)
    )
    offer = ServiceOffer(
        "body-composition",
        "CT body composition",
        REFERENCE_MODEL.name,
        mlserver.base_url,
        resolve_contract("tissue-composition"),
    )
    publisher = RegistryPublisher(client, PROVIDER)
    await publisher.publish(offer)
    async with HttpInferenceClient(mlserver.base_url) as inference:
        beat = await measure_heartbeat(inference, offer, queue_length=0, recent_durations=[])
    await publisher.beat(offer, beat)
    assert beat.status == "available"

    [service] = await client.find_services(query=ServiceQuery(modality="CT", body_part="CHEST"))
    assert await client.find_services(query=ServiceQuery(modality="MR")) == []
    assert (service.organization, service.offered_as) == (PROVIDER, "body-composition")
    assert service.service_id != "body-composition"  # the registry's id is not the provider's

    catalogue = [{"id": "body-composition", "inference_url": mlserver.base_url}]
    async with (
        client,
        InferenceNetwork(
            tmp_path / "sites",
            {REQUESTER: {}, PROVIDER: {"catalogue": catalogue}},
            services={REQUESTER: {SERVICE_OMI_REGISTRY: client}},
        ) as network,
    ):
        request = await network.request(
            REQUESTER,
            service=service.service_id,
            study_instance_uid=str(ct_small.StudyInstanceUID),
            dicomweb_endpoint=orthanc.dicomweb_url,
        )
        # Naming what it needs instead: the registry is searched and this service chosen.
        chosen = await network.request(
            REQUESTER,
            service_modality="CT",
            service_task="measurement",
            study_instance_uid=str(ct_small.StudyInstanceUID),
            dicomweb_endpoint=orthanc.dicomweb_url,
        )
        finished = await network.finished(REQUESTER, [request, chosen], 60)
        await network.settled()
    for task in (finished[request], finished[chosen]):
        assert task["status"] == "completed", task.get("output")
        summary = result_summary(task)
        assert summary["muscle-area"]["value"] == pytest.approx(CT_SMALL_AREAS["muscle"], abs=0.01)
    [service_chosen] = [
        o["valueString"]
        for o in finished[chosen]["output"]
        if o["type"]["coding"][0]["code"] == "service-chosen"
    ]
    assert service_chosen == f"{PROVIDER}/body-composition"
