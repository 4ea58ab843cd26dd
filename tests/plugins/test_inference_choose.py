"""The requesting site chooses among OMI registry search results (``docs/omi.md``, "Choosing
among search results"): ResolveService against the registry fixture and real Orthanc, one
handler call per case; and the registry's contract checks a study resolved by id."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from pydicom.dataset import Dataset

from dsf_bridge.logs import configure_logging
from dsf_bridge.omi.contract import InferenceContract, resolve_contract
from dsf_bridge.omi.contract_resources import CONTRACT_EXTENSION
from dsf_bridge.omi.publish import RegistryPublisher, ServiceOffer
from dsf_bridge.omi.registry import FhirRegistryClient, Heartbeat
from dsf_bridge.plugins.inference import (
    CODESYSTEM_OMI,
    REQUEST_INVALID,
    SERVICE_OMI_REGISTRY,
    SERVICE_UNAVAILABLE,
    resolve_service,
)
from dsf_bridge.plugins.registry import BpmnError, HandlerContext
from dsf_bridge.sandbox.components import OrthancProcess
from tests.omi.fhir_registry import FhirRegistry, client, registry
from tests.plugins.test_inference import studies

__all__ = ["client", "registry", "studies"]


def _mr_only() -> InferenceContract:
    raw = resolve_contract("tissue-composition").model_dump(mode="json")
    raw["accepts"]["modality"] = ["MR"]
    return InferenceContract.model_validate(raw)


def _beat(status: str = "available", *, waiting: float = 0, age: float = 5) -> Heartbeat:
    return Heartbeat(
        status=status,
        queue_length=0 if waiting == 0 else 2,
        estimated_waiting_time=dt.timedelta(seconds=waiting),
        # From now, not from when the module was imported: a session runs for many minutes.
        last_seen=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age),
    )


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    yield out
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    structlog.reset_defaults()


async def _provide(
    client: FhirRegistryClient,
    organization: str,
    beat: Heartbeat,
    contract: InferenceContract | None = None,
) -> None:
    contract = contract or resolve_contract("tissue-composition")
    offer = ServiceOffer(
        "body", "Body composition", "tissue-composition", "http://ai:8080", contract
    )
    publisher = RegistryPublisher(client, organization)
    await publisher.publish(offer)
    await publisher.beat(offer, beat)


def _context(
    client: FhirRegistryClient, study: str, archive: str, **inputs: object
) -> HandlerContext:
    task_inputs: list[dict[str, Any]] = [
        {"system": CODESYSTEM_OMI, "code": "study-instance-uid", "value": study},
        {"system": CODESYSTEM_OMI, "code": "dicomweb-endpoint", "value": archive},
    ]
    task_inputs += [
        {"system": CODESYSTEM_OMI, "code": code.replace("_", "-"), "value": value}
        for code, value in inputs.items()
    ]
    return HandlerContext(
        "ResolveService",
        "ResolveService",
        "bk",
        {"task": {"id": "start-1", "inputs": task_inputs}},
        services={SERVICE_OMI_REGISTRY: client},
    )


async def test_the_one_usable_service_is_chosen_and_why_is_recorded(
    registry: FhirRegistry,
    client: FhirRegistryClient,
    orthanc: OrthancProcess,
    studies: tuple[Dataset, list[Dataset]],
    logs: io.StringIO,
) -> None:
    ct_small, _ = studies
    # Published first, so each would win the tie-break on the registry id if it were usable.
    await _provide(client, "tampered.test", _beat())
    await _provide(client, "stale.test", _beat(age=3600))
    await _provide(client, "mr.test", _beat(), _mr_only())
    await _provide(client, "down.test", _beat("unavailable"))
    await _provide(client, "busy.test", _beat("busy", waiting=5))
    await _provide(client, "quick.test", _beat("available", waiting=0))
    tampered = next(
        d for d in registry.all("Device") if d["identifier"][0]["value"] == "tampered.test/body"
    )
    extension = next(e for e in tampered["extension"] if e["url"] == CONTRACT_EXTENSION)
    extension["extension"][1]["valueString"] = "0" * 64

    ctx = _context(
        client,
        str(ct_small.StudyInstanceUID),
        orthanc.dicomweb_url,
        service_task="measurement",
    )
    await resolve_service(ctx)

    assert ctx.updates["provider"] == "quick.test"
    assert ctx.updates["serviceId"] == "body"  # the provider's catalogue id
    assert ctx.updates["target"] == {"organizationIdentifier": "quick.test"}
    assert ctx.updates["serviceContract"] == resolve_contract("tissue-composition").model_dump(
        mode="json"
    )
    [output] = ctx.task_output_updates.values()
    assert "service-chosen" in json.dumps(output)
    assert "quick.test/body" in json.dumps(output)

    [record] = [
        json.loads(line)
        for line in logs.getvalue().splitlines()
        if json.loads(line)["event"] == "inference.service_chosen"
    ]
    assert (record["found"], record["usable"]) == (6, 2)
    dropped = " | ".join(record["dropped"].values())
    assert "sent no heartbeat for 36" in dropped
    assert "accepts.modality is MR, the series is CT" in dropped
    assert "reports itself unavailable" in dropped
    assert "SHA-256" in dropped
    assert str(ct_small.StudyInstanceUID) not in logs.getvalue()


async def test_available_beats_busy_and_a_shorter_wait_beats_a_longer_one(
    client: FhirRegistryClient,
    orthanc: OrthancProcess,
    studies: tuple[Dataset, list[Dataset]],
) -> None:
    ct_small, _ = studies
    await _provide(client, "busy.test", _beat("busy", waiting=1))
    await _provide(client, "slow.test", _beat("available", waiting=30))
    await _provide(client, "fast.test", _beat("available", waiting=2))
    ctx = _context(
        client, str(ct_small.StudyInstanceUID), orthanc.dicomweb_url, service_modality="ct"
    )
    await resolve_service(ctx)
    assert ctx.updates["provider"] == "fast.test"


async def test_no_service_that_can_take_the_study_fails_naming_the_query_and_the_reasons(
    client: FhirRegistryClient,
    orthanc: OrthancProcess,
    studies: tuple[Dataset, list[Dataset]],
) -> None:
    ct_small, _ = studies
    study = str(ct_small.StudyInstanceUID)
    await _provide(client, "mr.test", _beat(), _mr_only())
    await _provide(client, "stale.test", _beat(age=3600))

    with pytest.raises(BpmnError) as raised:
        await resolve_service(_context(client, study, orthanc.dicomweb_url, service_modality="US"))
    assert raised.value.code == SERVICE_UNAVAILABLE
    assert raised.value.message == "no service in the OMI registry offers modality US"

    with pytest.raises(BpmnError) as raised:
        await resolve_service(
            _context(client, study, orthanc.dicomweb_url, service_task="measurement")
        )
    assert raised.value.code == SERVICE_UNAVAILABLE
    message = raised.value.message
    assert message.startswith(
        "none of the 2 services in the OMI registry that offer task measurement can take the "
        "study ("
    )
    assert "accepts.modality is MR, the series is CT" in message
    assert "sent no heartbeat" in message


async def test_a_service_named_by_id_is_checked_against_its_registry_contract(
    registry: FhirRegistry,
    client: FhirRegistryClient,
    orthanc: OrthancProcess,
    studies: tuple[Dataset, list[Dataset]],
) -> None:
    ct_small, _ = studies
    study = str(ct_small.StudyInstanceUID)
    await _provide(client, "mr.test", _beat(), _mr_only())
    with pytest.raises(BpmnError) as raised:
        await resolve_service(_context(client, study, orthanc.dicomweb_url, service="mr.test/body"))
    assert raised.value.code == REQUEST_INVALID
    assert "accepts.modality is MR, the series is CT" in raised.value.message

    [device] = registry.all("Device")
    extension = next(e for e in device["extension"] if e["url"] == CONTRACT_EXTENSION)
    extension["extension"][1]["valueString"] = "0" * 64
    with pytest.raises(BpmnError) as raised:
        await resolve_service(_context(client, study, orthanc.dicomweb_url, service="mr.test/body"))
    assert raised.value.code == SERVICE_UNAVAILABLE
    assert (
        "its contract in the OMI registry is refused: the contract's SHA-256"
        in raised.value.message
    )


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "the Task has no 'service' input and no 'service-modality'"),
        (
            {"service": "x", "service_modality": "CT"},
            "the Task names a 'service' and what it must offer",
        ),
        ({"service_task": "dance"}, "input 'service-task': task must be one of measurement"),
    ],
)
async def test_a_start_task_names_a_service_or_what_it_needs(
    client: FhirRegistryClient, inputs: dict[str, object], message: str
) -> None:
    ctx = _context(client, "1.2.3", "http://pacs.test/dicom-web", **inputs)
    with pytest.raises(BpmnError) as raised:
        await resolve_service(ctx)
    assert raised.value.code == REQUEST_INVALID
    assert message in raised.value.message
