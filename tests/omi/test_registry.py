"""The OMI registry client against a canned FHIR server (httpx.MockTransport), the heartbeat
check and the local catalogue."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from dsf_bridge.omi.registry import (
    ALGORITHM_EXTENSION,
    DSF_ORGANIZATION_IDENTIFIER_SYSTEM,
    HEARTBEAT_EXTENSION,
    MAX_PAGE_BYTES,
    OIP_CONNECTION_TYPE,
    FhirRegistryClient,
    Heartbeat,
    InferenceService,
    LocalCatalogue,
    RegistryError,
    ServiceNotFoundError,
    ServiceUnavailableError,
    check_heartbeat,
)

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def _service(
    service_id: str, *, endpoint: str | None = "ep1", heartbeat: bool = True
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "HealthcareService",
        "id": service_id,
        "active": True,
        "name": f"Tissue composition ({service_id})",
        "providedBy": {"reference": "Organization/org1"},
        "extension": [{"url": ALGORITHM_EXTENSION, "valueReference": {"reference": "Device/dev1"}}],
    }
    if endpoint:
        resource["endpoint"] = [{"reference": f"Endpoint/{endpoint}"}]
    if heartbeat:
        resource["extension"].append(
            {
                "url": HEARTBEAT_EXTENSION,
                "extension": [
                    {"url": "status", "valueCode": "busy"},
                    {"url": "queueLength", "valueInteger": 3},
                    {
                        "url": "estimatedWaitingTime",
                        "valueDuration": {
                            "value": 2,
                            "unit": "min",
                            "system": "http://unitsofmeasure.org",
                            "code": "min",
                        },
                    },
                    {"url": "lastSeen", "valueInstant": "2026-11-01T11:58:00+00:00"},
                ],
            }
        )
    return resource


ENDPOINT = {
    "resourceType": "Endpoint",
    "id": "ep1",
    "status": "active",
    "connectionType": {"system": OIP_CONNECTION_TYPE[0], "code": OIP_CONNECTION_TYPE[1]},
    "payloadType": [{"text": "Open Inference Protocol v2"}],
    "address": "https://ai.provider.test/oip",
}
ORGANIZATION = {
    "resourceType": "Organization",
    "id": "org1",
    "identifier": [{"system": DSF_ORGANIZATION_IDENTIFIER_SYSTEM, "value": "provider.test"}],
}
DEVICE = {
    "resourceType": "Device",
    "id": "dev1",
    "deviceName": [{"name": "tissue-composition", "type": "model-name"}],
    "version": [{"value": "1"}],
}


def _bundle(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in resources],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    Bundle.model_validate(bundle)  # the canned answers are valid FHIR
    return bundle


def _registry(requests: list[httpx.Request]) -> FhirRegistryClient:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        path, query = request.url.path, request.url.params
        if path == "/fhir/HealthcareService" and query.get("_id") == "gone":
            return httpx.Response(200, json=_bundle([]))
        if path == "/fhir/HealthcareService" and "page" not in query:
            return httpx.Response(
                200,
                json=_bundle(
                    [_service("hs1"), ENDPOINT, ORGANIZATION],
                    next_url="http://registry.test/fhir/HealthcareService?page=2",
                ),
            )
        if path == "/fhir/HealthcareService":
            return httpx.Response(200, json=_bundle([_service("hs2", endpoint=None)]))
        if path == "/fhir/Device":
            return httpx.Response(200, json=_bundle([DEVICE]))
        return httpx.Response(404)

    return FhirRegistryClient("http://registry.test/fhir", transport=httpx.MockTransport(handler))


async def test_find_services_assembles_endpoint_device_organization_heartbeat() -> None:
    requests: list[httpx.Request] = []
    async with _registry(requests) as registry:
        services = await registry.find_services(model_name="tissue-composition")
    # hs2 has no OIP endpoint: skipped; the second page was followed.
    assert [s.service_id for s in services] == ["hs1"]
    service = services[0]
    assert service.inference_url == "https://ai.provider.test/oip"
    assert service.organization == "provider.test"
    assert service.model_version == "1"
    assert service.device_reference() == {"reference": "Device/dev1", "type": "Device"}
    assert service.heartbeat == Heartbeat(
        status="busy",
        queue_length=3,
        estimated_waiting_time=dt.timedelta(minutes=2),
        last_seen=dt.datetime(2026, 11, 1, 11, 58, tzinfo=dt.UTC),
    )
    first = requests[0].url.params
    assert first.get("active") == "true"
    assert first.get_list("_include") == [
        "HealthcareService:endpoint",
        "HealthcareService:organization",
    ]
    assert any(r.url.path == "/fhir/Device" and r.url.params["_id"] == "dev1" for r in requests)
    check_heartbeat(service, now=NOW)  # busy with a queue still takes work


async def test_filters_and_unknown_service() -> None:
    async with _registry([]) as registry:
        assert await registry.find_services(model_name="other-model") == []
        assert await registry.find_services(organization="someone.else") == []
        with pytest.raises(ServiceNotFoundError, match="gone is not in the registry"):
            await registry.get_service("gone")


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (403, False)])
async def test_registry_failures(status: int, retryable: bool) -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(status))
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as registry:
        with pytest.raises(RegistryError, match=f"HTTP {status}") as info:
            await registry.find_services()
    assert info.value.retryable is retryable


async def test_a_registry_answer_nested_too_deeply_is_a_registry_error() -> None:
    """A hostile or broken registry's search Bundle nested deeper than Python's JSON parser
    recurses: a RegistryError naming the registry, not a RecursionError out of the handler."""
    body = b'{"resourceType": "Bundle", "entry": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=body))
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as registry:
        with pytest.raises(RegistryError, match=r"registry\.test.* nested too deeply") as info:
            await registry.find_services()
    assert not info.value.retryable


async def test_a_registry_answer_larger_than_a_page_may_be_is_refused_unread() -> None:
    """A registry's answer is read up to MAX_PAGE_BYTES, not whole into memory: a hostile or
    broken registry's gigabyte would otherwise take the bridge (every process) down."""
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"resourceType": "Bundle", "entry": ['
        for _ in range(64):
            sent.append(1 << 20)
            yield b" " * (1 << 20)
        yield b"]}"

    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=chunks()))
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as registry:
        with pytest.raises(RegistryError, match=r"larger than 16777216 bytes") as info:
            await registry.find_services()
    assert not info.value.retryable
    assert MAX_PAGE_BYTES == 16 << 20
    assert sum(sent) <= MAX_PAGE_BYTES + (2 << 20)  # stopped reading, not read and measured


async def test_a_heartbeat_seen_at_a_time_without_zone_is_a_malformed_service() -> None:
    """A FHIR instant has a time zone; a registry's lastSeen without one is no instant. It
    parsed to a naive time, which the heartbeat check (an aware now) then failed on with a
    TypeError out of ResolveService."""
    service = _service("hs1")
    [beat] = [e for e in service["extension"] if e["url"] == HEARTBEAT_EXTENSION]
    beat["extension"][-1]["valueInstant"] = "2026-11-01T11:58:00"

    def handler(request: httpx.Request) -> httpx.Response:
        # Not through _bundle: the answer is deliberately no valid FHIR.
        found = [service, ENDPOINT, ORGANIZATION]
        if request.url.path == "/fhir/Device":
            found = [DEVICE]
        entries = [{"resource": r} for r in found]
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})

    transport = httpx.MockTransport(handler)
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as registry:
        services = await registry.find_services()
    for found in services:
        check_heartbeat(found, now=NOW)
    assert services == []


def _with_beat(status: str, seen: dt.datetime | None) -> InferenceService:
    return InferenceService(
        "s", "Service S", "m", "http://x", heartbeat=Heartbeat(status, last_seen=seen)
    )


def test_heartbeat_check() -> None:
    check_heartbeat(_with_beat("available", NOW), now=NOW)
    with pytest.raises(ServiceUnavailableError, match="reports itself unavailable") as info:
        check_heartbeat(_with_beat("unavailable", NOW), now=NOW)
    assert info.value.retryable
    with pytest.raises(ServiceUnavailableError, match="no heartbeat for 3600 s"):
        check_heartbeat(_with_beat("available", NOW - dt.timedelta(hours=1)), now=NOW)
    check_heartbeat(InferenceService("s", "S", "m", "http://x"))  # no heartbeat: passes
    # A lastSeen far ahead of this site's clock says nothing about now: it never went stale,
    # so a provider gone with its clock a day fast stayed the first choice for a day.
    with pytest.raises(ServiceUnavailableError, match="heartbeat is dated 86400 s ahead"):
        check_heartbeat(_with_beat("available", NOW + dt.timedelta(days=1)), now=NOW)
    check_heartbeat(_with_beat("available", NOW + dt.timedelta(minutes=1)), now=NOW)  # skew


async def test_local_catalogue_from_config() -> None:
    catalogue = LocalCatalogue.from_config(
        [
            {
                "id": "tc",
                "model_name": "tissue-composition",
                "inference_url": "http://127.0.0.1:8080",
                "organization": "provider.test",
            }
        ]
    )
    [service] = await catalogue.find_services(model_name="tissue-composition")
    assert service.name == "tc"
    assert service.device_reference()["identifier"]["value"] == "tissue-composition"
    assert await catalogue.get_service("tc") == service
    with pytest.raises(ServiceNotFoundError):
        await catalogue.get_service("nope")
    with pytest.raises(ValueError, match="lacks"):
        LocalCatalogue.from_config([{"id": "x"}])
    with pytest.raises(ValueError, match="unknown keys"):
        LocalCatalogue.from_config(
            [{"id": "x", "model_name": "m", "inference_url": "u", "modle": "typo"}]
        )
