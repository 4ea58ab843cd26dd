"""The provider side of OMI against a registry that behaves as a FHIR server does
(``tests/omi/fhir_registry.py``): publishing, idempotently; heartbeats measured on real MLServer;
search by what a service accepts; mutual TLS to the registry."""

from __future__ import annotations

import copy
import datetime as dt
import json
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.healthcareservice import HealthcareService

from dsf_bridge.api.server import EmbeddedUvicorn
from dsf_bridge.config import load_settings
from dsf_bridge.omi.contract import Accepts, load_contract, resolve_contract
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.omi.publish import (
    RegistryPublisher,
    ServiceOffer,
    measure_heartbeat,
    service_resources,
)
from dsf_bridge.omi.registry import (
    BODY_PART_SYSTEM,
    HEARTBEAT_EXTENSION,
    MODALITY_SYSTEM,
    TASK_SYSTEM,
    FhirRegistryClient,
    Heartbeat,
    RegistryError,
    ServiceNotFoundError,
    ServiceQuery,
    ServiceUnavailableError,
    check_heartbeat,
)
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.runtime.publishing import (
    _registry_tls,
    open_registry,
    publish_services,
    service_offers,
)
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.components import REFERENCE_MODEL, MLServerProcess
from tests.components import WARMING_MODEL, running
from tests.omi.fhir_registry import FhirRegistry, client, registry

__all__ = ["client", "registry"]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
ORG = "provider.test"


def _reference(url: str = "http://127.0.0.1:8080") -> ServiceOffer:
    contract = resolve_contract("tissue-composition")
    return ServiceOffer("tc", "Tissue composition", "tissue-composition", url, contract)


def _head_mr() -> ServiceOffer:
    contract = load_contract(EXAMPLES / "my-model.toml")
    contract = contract.model_copy(update={"accepts": Accepts(modality=["MR"], body_part=["HEAD"])})
    return ServiceOffer("nodules", "Nodules", "my-model", "http://127.0.0.1:8081", contract)


async def test_publish_creates_then_changes_nothing_then_updates(
    registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    publisher = RegistryPublisher(client, ORG)
    first = await publisher.publish(_reference())
    assert [(p.resource_type, p.outcome) for p in first] == [
        ("Device", "created"),
        ("Endpoint", "created"),
        ("HealthcareService", "created"),
    ]
    [device] = registry.all("Device")
    [endpoint] = registry.all("Endpoint")
    [service] = registry.all("HealthcareService")
    for model, resource in ((Device, device), (Endpoint, endpoint), (HealthcareService, service)):
        model.model_validate(resource)
        assert resource["identifier"][0]["value"] == f"{ORG}/tc"
    assert device["deviceName"][0] == {"name": "tissue-composition", "type": "model-name"}
    assert endpoint["address"] == "http://127.0.0.1:8080"
    assert service["providedBy"]["identifier"]["value"] == ORG
    assert service["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
    assert {"system": MODALITY_SYSTEM, "code": "CT"} in [
        c["coding"][0] for c in service["characteristic"]
    ]
    # The reference contract takes any body part, measures and segments on request.
    assert {"system": BODY_PART_SYSTEM, "code": "ANY"} in [
        c["coding"][0] for c in service["characteristic"]
    ]
    assert [t["coding"][0] for t in service["type"]] == [
        {"system": TASK_SYSTEM, "code": "measurement"},
        {"system": TASK_SYSTEM, "code": "segmentation"},
    ]
    writes = registry.writes

    second = await publisher.publish(_reference())
    assert [p.outcome for p in second] == ["unchanged"] * 3
    assert [p.id for p in second] == [p.id for p in first]
    assert registry.writes == writes  # running it twice changes nothing

    # A heartbeat, then a changed contract (a body part) and a new address: updated, the
    # heartbeat kept, nothing duplicated.
    await publisher.beat(_reference(), Heartbeat("available", 0, last_seen=dt.datetime.now(dt.UTC)))
    changed = _reference("http://127.0.0.1:9090")
    changed = ServiceOffer(
        changed.service_id,
        changed.name,
        changed.model_name,
        changed.inference_url,
        changed.contract.model_copy(
            update={"accepts": Accepts(modality=["CT"], body_part=["CHEST"])}
        ),
    )
    third = await publisher.publish(changed)
    assert [p.outcome for p in third] == ["updated", "updated", "updated"]
    assert len(registry.all("HealthcareService")) == len(registry.all("Device")) == 1
    [service] = registry.all("HealthcareService")
    assert service["meta"]["versionId"] == "3"  # created, beat, updated
    assert any(e["url"] == HEARTBEAT_EXTENSION for e in service["extension"])
    assert {"system": BODY_PART_SYSTEM, "code": "CHEST"} in [
        c["coding"][0] for c in service["characteristic"]
    ]
    assert registry.all("Endpoint")[0]["address"] == "http://127.0.0.1:9090"


async def test_search_by_what_a_service_accepts(
    registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    await publish_services(client, ORG, [_reference(), _head_mr()])

    async def ids(**query: str) -> list[str]:
        found = await client.find_services(query=ServiceQuery(**query))
        return sorted(s.name for s in found)

    assert await ids(modality="CT") == ["Tissue composition"]
    assert await ids(modality="mr", body_part="head") == ["Nodules"]
    assert await ids(modality="MR", body_part="CHEST") == []
    # A service that takes any body part is found by every body part.
    assert await ids(modality="CT", body_part="CHEST") == ["Tissue composition"]
    assert await ids(task="segmentation") == ["Tissue composition"]
    assert await ids(modality="US") == []
    [nodules] = await client.find_services(query=ServiceQuery(modality="MR"))
    assert (nodules.modalities, nodules.body_parts) == (("MR",), ("HEAD",))
    assert nodules.organization == ORG
    assert nodules.model_name == "my-model"
    # A request names the service as the provider's catalogue knows it, found by either key.
    assert nodules.offered_as == "nodules"
    assert (await client.get_service(nodules.service_id)).offered_as == "nodules"
    by_key = await client.get_service(f"{ORG}/nodules")
    assert (by_key.service_id, by_key.model_name) == (nodules.service_id, "my-model")
    # The registry searched (it refuses parameters it does not know).
    searches = [url for method, url in registry.requests if "characteristic=" in url]
    assert searches
    with pytest.raises(ValueError, match="task must be one of"):
        ServiceQuery(task="segmentatoin")


async def test_a_registry_that_ignores_the_search_is_checked_here(
    registry: FhirRegistry,
) -> None:
    """A FHIR server ignores search parameters it does not support (lenient handling): the
    client checks what it got."""
    transport = httpx.ASGITransport(app=registry.app)
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as client:
        await publish_services(client, ORG, [_reference(), _head_mr()])

    def lenient(request: httpx.Request) -> httpx.Response:
        kept = [
            (k, v)
            for k, v in request.url.params.multi_items()
            if k not in ("characteristic", "service-type")
        ]
        answer = registry.search(request.url.path.rsplit("/", 1)[1], kept)
        return httpx.Response(answer.status_code, content=bytes(answer.body))

    async with FhirRegistryClient(
        "http://registry.test/fhir", transport=httpx.MockTransport(lenient)
    ) as client:
        found = await client.find_services(query=ServiceQuery(modality="MR", body_part="HEAD"))
    assert [s.name for s in found] == ["Nodules"]


async def test_heartbeats_reflect_the_model_server(
    registry: FhirRegistry, client: FhirRegistryClient, tmp_path: Path
) -> None:
    server = MLServerProcess(tmp_path / "mlserver", models=(REFERENCE_MODEL, WARMING_MODEL))
    offer = _reference(server.base_url)
    warming = ServiceOffer(
        "warming", "Warming", WARMING_MODEL.name, server.base_url, offer.contract
    )
    publisher = RegistryPublisher(client, ORG)
    await publisher.publish(offer)
    one_try = RetryPolicy(attempts=1)
    for _ in running(server):
        async with HttpInferenceClient(server.base_url, retry=one_try) as inference:
            idle = await measure_heartbeat(inference, offer, queue_length=0, recent_durations=[])
            busy = await measure_heartbeat(
                inference, offer, queue_length=2, recent_durations=[3.0, 5.0]
            )
            loading = await measure_heartbeat(
                inference, warming, queue_length=0, recent_durations=[]
            )
    assert (idle.status, idle.queue_length, idle.estimated_waiting_time) == (
        "available",
        0,
        dt.timedelta(0),
    )
    assert (busy.status, busy.estimated_waiting_time) == ("busy", dt.timedelta(seconds=8))
    assert loading.status == "unavailable"
    # The server has stopped now.
    async with HttpInferenceClient(server.base_url, retry=one_try, timeout=5) as inference:
        stopped = await measure_heartbeat(inference, offer, queue_length=1, recent_durations=[4.0])
    assert stopped.status == "unavailable"
    assert stopped.estimated_waiting_time == dt.timedelta(seconds=4)

    await publisher.beat(offer, busy)
    [found] = await client.find_services()
    assert found.heartbeat is not None
    assert (found.heartbeat.status, found.heartbeat.queue_length) == ("busy", 2)
    assert found.heartbeat.estimated_waiting_time == dt.timedelta(seconds=8)
    check_heartbeat(found)
    await publisher.beat(offer, stopped)
    [found] = await client.find_services()
    with pytest.raises(ServiceUnavailableError, match="reports itself unavailable"):
        check_heartbeat(found)


async def test_a_registry_that_is_down_fails_retryably(
    registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    registry.up = False
    with pytest.raises(RegistryError, match="HTTP 503") as info:
        await RegistryPublisher(client, ORG).publish(_reference())
    assert info.value.retryable
    registry.up = True
    with pytest.raises(RegistryError, match="not published"):
        await RegistryPublisher(client, ORG).beat(_reference(), Heartbeat("available"))


async def test_publishing_over_mutual_tls_with_the_site_settings(
    registry: FhirRegistry, tmp_path: Path
) -> None:
    ca = CertificateAuthority("Registry test CA")
    ca.write(tmp_path / "ca.pem")
    ca.issue_server("localhost").write(tmp_path / "server.pem", tmp_path / "server.key")
    ca.issue_client("provider").write(tmp_path / "client.pem", tmp_path / "client.key")
    server = EmbeddedUvicorn(
        registry.app,
        ssl_certfile=str(tmp_path / "server.pem"),
        ssl_keyfile=str(tmp_path / "server.key"),
        ssl_ca_certs=str(tmp_path / "ca.pem"),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    await server.start()
    try:
        settings = load_settings(
            None,
            {
                "dsf": {
                    "client_certificate": str(tmp_path / "client.pem"),
                    "client_key": str(tmp_path / "client.key"),
                    "ca_certificates": [str(tmp_path / "ca.pem")],
                },
                "omi": {
                    "registry_url": f"https://localhost:{server.port}/fhir",
                    "publish": True,
                    "catalogue": [
                        {"id": "tc", "inference_url": "http://127.0.0.1:8080"},
                        {"id": "requested-only", "organization": "other.test"},
                    ],
                },
            },
        )
        offers = service_offers(settings.omi)
        assert [o.service_id for o in offers] == ["tc"]  # what this site offers
        async with open_registry(settings) as client:
            done = await publish_services(client, ORG, offers)
        assert [p.outcome for p in done["tc"]] == ["created"] * 3
        # Without the client certificate the registry refuses the handshake.
        plain = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        async with FhirRegistryClient(
            f"https://localhost:{server.port}/fhir", verify=plain
        ) as client:
            with pytest.raises(RegistryError, match="unreachable"):
                await client.find_services()
    finally:
        await server.stop()


class _LikeAServer(httpx.AsyncBaseTransport):
    """Review: what real FHIR servers do that the test registry does not. ``strip``: empty
    arrays are dropped from what is stored (FHIR JSON has none); ``ignore``: search parameters
    the server does not support are ignored."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, ignore: tuple[str, ...] = ()) -> None:
        self.inner = inner
        self.ignore = ignore

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and self.ignore:
            params = httpx.QueryParams(
                [(k, v) for k, v in request.url.params.multi_items() if k not in self.ignore]
            )
            url = request.url.copy_with(params=params)
            request = httpx.Request("GET", url, headers=request.headers)
        elif request.method in ("POST", "PUT"):
            body = _without_empty(json.loads(await request.aread()))
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            request = httpx.Request(request.method, request.url, headers=headers, json=body)
        return await self.inner.handle_async_request(request)


def _without_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v != []}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


def _segmentation_only() -> ServiceOffer:
    contract = resolve_contract("tissue-composition")
    contract = contract.model_copy(
        update={"outputs": contract.outputs.model_copy(update={"measurements": []})}
    )
    return ServiceOffer("seg", "Segmentation", "tissue-composition", "http://x:8080", contract)


async def test_a_service_without_output_codes_publishes_once(registry: FhirRegistry) -> None:
    """Review: an empty ``valueCode`` array (a segmentation-only contract has no output
    codes) is dropped by a FHIR server, so every publish compared unequal and wrote again."""
    offer = _segmentation_only()
    for resource in service_resources(offer, ORG).values():
        assert "[]" not in json.dumps(resource)
    transport = _LikeAServer(httpx.ASGITransport(app=registry.app))
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as client:
        publisher = RegistryPublisher(client, ORG)
        await publisher.publish(offer)
        writes = registry.writes
        again = await publisher.publish(offer)
    assert [p.outcome for p in again] == ["unchanged"] * 3
    assert registry.writes == writes


async def test_a_registry_that_ignores_the_identifier_search_keeps_other_sites_resources(
    registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    """Review: the publisher took whatever one resource a search returned as its own and
    updated it; a registry that ignores ``identifier`` had it overwrite another site's."""
    await RegistryPublisher(client, "other.test").publish(_reference())
    theirs = copy.deepcopy(registry.resources)
    transport = _LikeAServer(httpx.ASGITransport(app=registry.app), ignore=("identifier",))
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as lenient:
        done = await RegistryPublisher(lenient, ORG).publish(_reference())
    assert [p.outcome for p in done] == ["created"] * 3
    for kind, resources in theirs.items():
        for rid, resource in resources.items():
            assert registry.resources[kind][rid] == resource


@pytest.mark.parametrize(
    "bundle",
    [
        {"resourceType": "Bundle", "entry": [{"resource": "HealthcareService"}]},
        {"resourceType": "Bundle", "entry": [{"resource": {"id": "1"}}]},
        {"resourceType": "Bundle", "entry": [7], "link": "next"},
        {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "HealthcareService",
                        "id": "1",
                        "endpoint": "Endpoint/2",
                        "identifier": 5,
                    }
                }
            ],
        },
    ],
)
async def test_a_registry_answering_garbage_is_an_error_or_nothing_never_a_crash(
    bundle: dict[str, Any],
) -> None:
    """Review: these raised TypeError, KeyError or AttributeError out of the client."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=bundle))
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as client:
        assert await client.find_services() == []
        with pytest.raises(RegistryError):
            await RegistryPublisher(client, ORG).publish(_reference())


def test_a_site_without_a_client_certificate_still_trusts_only_the_registry_cas(
    tmp_path: Path,
) -> None:
    """Review: without [dsf] client_certificate, registry_ca_certificates was ignored and the
    system's CAs were trusted instead (verify=True)."""
    ca = CertificateAuthority("Registry only CA")
    ca.write(tmp_path / "ca.pem")
    settings = load_settings(
        None,
        {
            "omi": {
                "registry_url": "https://registry.example/fhir",
                "registry_ca_certificates": [str(tmp_path / "ca.pem")],
            }
        },
    )
    verify = _registry_tls(settings)
    assert isinstance(verify, ssl.SSLContext)
    assert [c["subject"] for c in verify.get_ca_certs()] == [
        ((("commonName", "Registry only CA"),),)
    ]


async def test_a_registry_that_ignores_the_lookup_does_not_pick_another_service(
    registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    """Review: get_service took the first service of whatever the registry answered; one that
    ignores ``identifier`` (or ``_id``) sent the request to another site's service."""
    await RegistryPublisher(client, "other.test").publish(_head_mr())
    await RegistryPublisher(client, ORG).publish(_reference())
    transport = _LikeAServer(httpx.ASGITransport(app=registry.app), ignore=("identifier", "_id"))
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as lenient:
        found = await lenient.get_service(f"{ORG}/tc")
        assert (found.organization, found.offered_as) == (ORG, "tc")
        with pytest.raises(ServiceNotFoundError):
            await lenient.get_service(f"{ORG}/nodules")
        with pytest.raises(ServiceNotFoundError):
            await lenient.get_service("999")


async def test_an_answer_httpx_cannot_decode_is_a_registry_error() -> None:
    """Review: a body that claims gzip and is not raised httpx.DecodingError out of the client;
    at start-up of 'run' (which catches BridgeError only) that stopped the bridge."""

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/fhir+json"},
            stream=httpx.ByteStream(b"not gzip"),
        )

    async with FhirRegistryClient(
        "http://registry.test/fhir", transport=httpx.MockTransport(broken)
    ) as client:
        with pytest.raises(RegistryError):
            await client.find_services()
        with pytest.raises(RegistryError):
            await RegistryPublisher(client, ORG).publish(_reference())
