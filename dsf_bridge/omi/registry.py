"""Finding inference services: the OMI registry (FHIR) or a local catalogue from the config.

OMI models an algorithm as a FHIR ``Device``, a running service of it as a
``HealthcareService`` with an ``Endpoint`` (the Open Inference Protocol v2 base URL), and the
service's liveness as a heartbeat extension. OMI publishes no canonical URLs we could find for
these, so the bridge defines them under ``http://omi.de/fhir/registry/`` (documented in
``docs/omi.md``) and keeps them in one place, here:

- ``HealthcareService.extension[algorithm]`` (:data:`ALGORITHM_EXTENSION`): valueReference to
  the ``Device``; ``HealthcareService.endpoint``: the OIP v2 ``Endpoint``
  (``connectionType`` :data:`OIP_CONNECTION_TYPE`); ``providedBy``: the Organization, carrying
  the DSF organization identifier the request Task is addressed to.
- ``Device.deviceName`` of type ``model-name``: the model name on the inference server;
  ``Device.version``: its version; ``Device.identifier`` (:data:`DEVICE_IDENTIFIER_SYSTEM`).
- ``HealthcareService.extension[heartbeat]`` (:data:`HEARTBEAT_EXTENSION`) with sub-extensions
  ``status`` (valueCode ``available`` | ``busy`` | ``unavailable``), ``queueLength``
  (valueInteger), ``estimatedWaitingTime`` (valueDuration, seconds) and ``lastSeen``
  (valueInstant).
- What a service accepts, as elements a FHIR server can search (``docs/omi.md``, "Publishing a
  service"): ``HealthcareService.characteristic`` holds one CodeableConcept per accepted
  modality (:data:`MODALITY_SYSTEM`, DICOM's own codes) and per accepted body part
  (:data:`BODY_PART_SYSTEM`, the DICOM BodyPartExamined value; :data:`ANY_BODY_PART` when the
  contract takes any), searched with ``characteristic``; ``HealthcareService.type`` holds what
  the service does (:data:`TASK_SYSTEM`: ``measurement``, ``classification``,
  ``segmentation``), searched with ``service-type``. ``HealthcareService.identifier``
  (:data:`SERVICE_IDENTIFIER_SYSTEM`), ``Device.identifier`` and ``Endpoint.identifier``
  (:data:`ENDPOINT_IDENTIFIER_SYSTEM`) carry ``<organization>/<catalogue id>``, the keys a
  provider publishes by (``dsf_bridge.omi.publish``).
- The service contract on the ``Device`` (``dsf_bridge.omi.contract_resources``): read into
  :attr:`InferenceService.contract`, or refused with :attr:`InferenceService.contract_problem`.

Errors: :class:`RegistryError` (a :class:`~dsf_bridge.errors.RemoteError`) when the registry
fails, :class:`ServiceNotFoundError` when no service matches, :class:`ServiceUnavailableError`
when the heartbeat says the service cannot take work (retryable: it may come back).
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import httpx
import structlog

from dsf_bridge.errors import RemoteError
from dsf_bridge.omi.contract import ContractError, InferenceContract
from dsf_bridge.omi.contract_resources import (
    BODY_PART_SYSTEM,
    MODALITY_SYSTEM,
    contract_from_device,
)
from dsf_bridge.proxy import ForwardProxy

__all__ = [
    "ALGORITHM_EXTENSION",
    "ANY_BODY_PART",
    "BODY_PART_SYSTEM",
    "DEVICE_IDENTIFIER_SYSTEM",
    "DSF_ORGANIZATION_IDENTIFIER_SYSTEM",
    "ENDPOINT_IDENTIFIER_SYSTEM",
    "HEARTBEAT_EXTENSION",
    "MAX_PAGE_BYTES",
    "MODALITY_SYSTEM",
    "OIP_CONNECTION_TYPE",
    "SERVICE_IDENTIFIER_SYSTEM",
    "TASKS",
    "TASK_SYSTEM",
    "FhirRegistryClient",
    "Heartbeat",
    "InferenceService",
    "LocalCatalogue",
    "RegistryError",
    "ServiceNotFoundError",
    "ServiceQuery",
    "ServiceRegistry",
    "ServiceUnavailableError",
    "check_heartbeat",
    "heartbeat_extension",
]

_log = structlog.get_logger()

_REGISTRY = "http://omi.de/fhir/registry"
ALGORITHM_EXTENSION = f"{_REGISTRY}/StructureDefinition/algorithm"
HEARTBEAT_EXTENSION = f"{_REGISTRY}/StructureDefinition/heartbeat"
DEVICE_IDENTIFIER_SYSTEM = f"{_REGISTRY}/sid/device"
OIP_CONNECTION_TYPE = (f"{_REGISTRY}/CodeSystem/endpoint-connection-type", "oip-v2-rest")
DSF_ORGANIZATION_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/organization-identifier"
SERVICE_IDENTIFIER_SYSTEM = f"{_REGISTRY}/sid/service"
ENDPOINT_IDENTIFIER_SYSTEM = f"{_REGISTRY}/sid/endpoint"
#: The body part code of a service whose contract takes any body part.
ANY_BODY_PART = "ANY"
TASK_SYSTEM = f"{_REGISTRY}/CodeSystem/inference-task"
#: What a service can do, by the outputs its contract declares.
TASKS = ("measurement", "classification", "segmentation")

_STATUSES = frozenset({"available", "busy", "unavailable"})
#: The most of one registry answer (a search page, a resource) that is read: a search page of
#: services with their Devices and contracts (256 KiB each at most) stays far below.
MAX_PAGE_BYTES = 16 << 20


class RegistryError(RemoteError):
    """The registry failed or answered something that is not a usable search result."""


class ServiceNotFoundError(RegistryError):
    """No active service matches: not retryable until someone changes the registry."""


class ServiceUnavailableError(RegistryError):
    """The service's heartbeat says it cannot take work now, or is stale."""

    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


@dataclass(frozen=True)
class Heartbeat:
    status: str
    queue_length: int | None = None
    estimated_waiting_time: dt.timedelta | None = None
    last_seen: dt.datetime | None = None


@dataclass(frozen=True)
class InferenceService:
    """One service that runs one model, and how to reach it."""

    service_id: str
    name: str
    model_name: str
    inference_url: str
    organization: str | None = None
    model_version: str | None = None
    device: Mapping[str, Any] = field(default_factory=dict)
    heartbeat: Heartbeat | None = None
    # What it accepts and does, as published (empty: not known, as for a catalogue entry).
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    # The id the provider's own catalogue knows the service by (a published service's
    # identifier without the organization): what a request Task's 'service' input names.
    offered_as: str | None = None
    # The contract its Device publishes (None: none published), or why the published one is
    # refused (damaged, tampered, invalid): then ``contract`` is None.
    contract: InferenceContract | None = None
    contract_problem: str | None = None

    def offers(self, query: ServiceQuery) -> bool:
        """Whether the service, as far as it is known, takes what ``query`` asks for; a
        service that publishes nothing about it does not."""
        if query.modality is not None and query.modality not in self.modalities:
            return False
        if query.body_part is not None and not (
            query.body_part in self.body_parts or ANY_BODY_PART in self.body_parts
        ):
            return False
        return query.task is None or query.task in self.tasks

    def device_reference(self) -> dict[str, Any]:
        """A FHIR Reference to the model's Device for results' ``Observation.device``."""
        if self.device:
            return dict(self.device)
        return {
            "type": "Device",
            "identifier": {"system": DEVICE_IDENTIFIER_SYSTEM, "value": self.model_name},
            "display": self.name,
        }


@dataclass(frozen=True)
class ServiceQuery:
    """What a requesting site looks for: a modality (DICOM Modality, e.g. ``CT``), a body part
    (DICOM BodyPartExamined, e.g. ``CHEST``; services that take any body part match) and a
    task (:data:`TASKS`); None: any."""

    modality: str | None = None
    body_part: str | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        for name in ("modality", "body_part"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, value.strip().upper() or None)

    def describe(self) -> str:
        """The query as people read it, for messages: ``modality CT, body part CHEST``."""
        named = [
            f"{label} {value}"
            for label, value in (
                ("modality", self.modality),
                ("body part", self.body_part),
                ("task", self.task),
            )
            if value is not None
        ]
        return ", ".join(named) or "any service"

    def search_params(self) -> dict[str, str]:
        """The FHIR search parameters of the query (``docs/omi.md``, the mapping)."""
        characteristic = []
        if self.modality is not None:
            characteristic.append(f"{MODALITY_SYSTEM}|{_escaped(self.modality)}")
        if self.body_part is not None:
            # A comma is FHIR's "or": the body part itself, or a service that takes any.
            characteristic.append(
                f"{BODY_PART_SYSTEM}|{_escaped(self.body_part)},{BODY_PART_SYSTEM}|{ANY_BODY_PART}"
            )
        params: dict[str, Any] = {}
        if characteristic:
            params["characteristic"] = characteristic
        if self.task is not None:
            params["service-type"] = f"{TASK_SYSTEM}|{self.task}"
        return params


def _escaped(value: str) -> str:
    """A token value with FHIR's search separators escaped."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


class ServiceRegistry(Protocol):
    """What the inference request process needs: find services, resolve one by id."""

    async def find_services(
        self,
        *,
        model_name: str | None = None,
        organization: str | None = None,
        query: ServiceQuery | None = None,
    ) -> list[InferenceService]: ...

    async def get_service(self, service_id: str) -> InferenceService: ...


def check_heartbeat(
    service: InferenceService,
    *,
    now: dt.datetime | None = None,
    max_age: dt.timedelta = dt.timedelta(minutes=10),
) -> None:
    """Raise :class:`ServiceUnavailableError` unless the service can take work.

    A service without heartbeat passes (a local catalogue entry has none); ``busy`` passes,
    since a queue is not a refusal.
    """
    beat = service.heartbeat
    if beat is None:
        return
    if beat.status == "unavailable":
        raise ServiceUnavailableError(f"service {service.name} reports itself unavailable")
    if beat.last_seen is not None:
        age = (now or dt.datetime.now(dt.UTC)) - beat.last_seen
        if age > max_age:
            raise ServiceUnavailableError(
                f"service {service.name} sent no heartbeat for {int(age.total_seconds())} s"
            )
        if -age > max_age:
            # Beyond any clock skew: a time ahead never goes stale, so a provider gone with a
            # fast clock would stay a choice until its lastSeen came.
            raise ServiceUnavailableError(
                f"service {service.name}'s heartbeat is dated {int(-age.total_seconds())} s "
                "ahead of this site's clock"
            )


class LocalCatalogue:
    """Services from the bridge's configuration, for sites without a registry."""

    def __init__(self, services: Iterable[InferenceService]) -> None:
        self._services = {service.service_id: service for service in services}

    @classmethod
    def from_config(cls, entries: Sequence[Mapping[str, Any]]) -> LocalCatalogue:
        """Entries with ``id``, ``model_name``, ``inference_url`` and optionally ``name``,
        ``organization``, ``model_version``."""
        services = []
        for index, entry in enumerate(entries):
            missing = {"id", "model_name", "inference_url"} - entry.keys()
            if missing:
                raise ValueError(f"catalogue entry {index} lacks {sorted(missing)}")
            unknown = entry.keys() - {
                "id",
                "name",
                "model_name",
                "inference_url",
                "organization",
                "model_version",
            }
            if unknown:
                raise ValueError(f"catalogue entry {index} has unknown keys {sorted(unknown)}")
            services.append(
                InferenceService(
                    service_id=str(entry["id"]),
                    name=str(entry.get("name") or entry["id"]),
                    model_name=str(entry["model_name"]),
                    inference_url=str(entry["inference_url"]),
                    organization=entry.get("organization"),
                    model_version=entry.get("model_version"),
                )
            )
        return cls(services)

    async def find_services(
        self,
        *,
        model_name: str | None = None,
        organization: str | None = None,
        query: ServiceQuery | None = None,
    ) -> list[InferenceService]:
        return _matching(self._services.values(), model_name, organization, query)

    async def get_service(self, service_id: str) -> InferenceService:
        try:
            return self._services[service_id]
        except KeyError:
            raise ServiceNotFoundError(
                f"service {service_id} is not in the local catalogue"
            ) from None


class FhirRegistryClient:
    """Searches an OMI registry FHIR server for active HealthcareServices with their Endpoints,
    Organizations and Devices. ``proxy`` is the site's forward proxy (``[proxy]``), used unless
    the registry's host bypasses it; the proxy environment is never read."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        page_limit: int = 20,
        proxy: ForwardProxy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._page_limit = page_limit
        route = proxy.route(self.base_url) if proxy is not None else None
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            verify=verify,
            headers={"Accept": "application/fhir+json"},
            transport=transport,
            proxy=httpx.Proxy(route.url, auth=route.auth) if route is not None else None,
            trust_env=False,  # the proxy is [proxy]'s, never HTTPS_PROXY's
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def find_services(
        self,
        *,
        model_name: str | None = None,
        organization: str | None = None,
        query: ServiceQuery | None = None,
    ) -> list[InferenceService]:
        """Active services; with ``query``, those that accept its modality, body part and
        task, searched by the registry and checked again here (a server that does not know a
        search parameter ignores it)."""
        params: dict[str, Any] = {
            "active": "true",
            "_include": ["HealthcareService:endpoint", "HealthcareService:organization"],
            **(query.search_params() if query is not None else {}),
        }
        resources = await self.search("HealthcareService", params)
        services = await self._assemble(resources)
        found = _matching(services, model_name, organization, query)
        _log.info("registry.searched", services=len(found))
        return found

    async def get_service(self, service_id: str) -> InferenceService:
        """The service by its id in the registry, or by its published identifier
        ``<organization>/<catalogue id>`` (a FHIR id holds no ``/``)."""
        key = (
            {"identifier": f"{SERVICE_IDENTIFIER_SYSTEM}|{_escaped(service_id)}"}
            if "/" in service_id
            else {"_id": service_id}
        )
        params = {
            **key,
            "_include": ["HealthcareService:endpoint", "HealthcareService:organization"],
        }
        services = [
            service
            for service in await self._assemble(await self.search("HealthcareService", params))
            # Checked here: a registry that ignored the search answers with other services.
            if service_id in (service.service_id, f"{service.organization}/{service.offered_as}")
        ]
        if not services:
            raise ServiceNotFoundError(
                f"service {service_id} is not in the registry at {self.base_url}"
            )
        return services[0]

    async def _assemble(self, resources: list[dict[str, Any]]) -> list[InferenceService]:
        by_ref = {f"{r['resourceType']}/{r.get('id')}": r for r in resources}
        healthcare = [r for r in resources if r.get("resourceType") == "HealthcareService"]
        device_ids = {
            ref.split("/", 1)[1]
            for service in healthcare
            if (ref := _extension_reference(service, ALGORITHM_EXTENSION)) is not None
            and ref.startswith("Device/")
        }
        if device_ids:
            devices = await self.search("Device", {"_id": ",".join(sorted(device_ids))})
            by_ref.update({f"Device/{d.get('id')}": d for d in devices})
        services = []
        for resource in healthcare:
            try:
                service = _service_from(resource, by_ref)
            except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
                # A registry's malformed resource (a string where an object belongs, a
                # lastSeen that is no instant) is one service fewer, never a crash.
                _log.warning(
                    "registry.service_malformed",
                    service_id=str(resource.get("id")),
                    reason=repr(exc),
                )
                continue
            if service is not None:
                services.append(service)
        return services

    async def search(self, resource_type: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every resource of a search, following ``next`` links up to ``page_limit`` pages."""
        found: list[dict[str, Any]] = []
        url: str | None = f"/{resource_type}"
        query: Mapping[str, Any] | None = params
        for _ in range(self._page_limit):
            if url is None:
                break
            bundle = await self._get(url, query)
            # A registry's garbage (an entry, resource or link that is no JSON object, a
            # resource without its type) is left out here, not raised as a TypeError later.
            found.extend(
                entry["resource"]
                for entry in _objects(bundle.get("entry"))
                if isinstance(entry.get("resource"), dict)
                and isinstance(entry["resource"].get("resourceType"), str)
            )
            url = next(
                (
                    str(link["url"])
                    for link in _objects(bundle.get("link"))
                    if link.get("relation") == "next" and link.get("url")
                ),
                None,
            )
            query = None  # the next link carries the query
        return found

    async def create(self, resource: Mapping[str, Any], *, if_none_exist: str) -> dict[str, Any]:
        """A conditional create (``If-None-Exist``): the resource as the registry holds it,
        new or the one that matched."""
        kind = str(resource["resourceType"])
        response = await self._send(
            "POST", f"/{kind}", resource, {"If-None-Exist": if_none_exist}, (200, 201)
        )
        return await self._stored(response, kind)

    async def update(self, resource: Mapping[str, Any], *, version: str | None) -> dict[str, Any]:
        """``PUT`` of a resource with an id; with ``version``, only over that version
        (``If-Match``: a registry change in between answers 412, retryable)."""
        kind = str(resource["resourceType"])
        headers = {"If-Match": f'W/"{version}"'} if version is not None else {}
        response = await self._send(
            "PUT", f"/{kind}/{resource['id']}", resource, headers, (200, 201)
        )
        return await self._stored(response, kind)

    async def _send(
        self,
        method: str,
        url: str,
        resource: Mapping[str, Any],
        headers: Mapping[str, str],
        expected: tuple[int, ...],
    ) -> httpx.Response:
        try:
            response = await self._client.request(
                method,
                url,
                json=resource,
                headers={
                    "Content-Type": "application/fhir+json",
                    "Prefer": "return=representation",
                    **headers,
                },
            )
        except httpx.HTTPError as exc:  # unreachable, or an answer httpx cannot read
            raise RegistryError(
                f"the OMI registry at {self.base_url} is unreachable: {exc}", retryable=True
            ) from exc
        if response.status_code not in expected:
            raise RegistryError(
                f"the OMI registry at {self.base_url} answered HTTP {response.status_code} to "
                f"{method} {url}",
                retryable=response.status_code in (409, 412, 429) or response.status_code >= 500,
                status=response.status_code,
            )
        return response

    async def _stored(self, response: httpx.Response, kind: str) -> dict[str, Any]:
        """The resource a write answered with, read back when the registry sent none."""
        try:
            body = response.json() if response.content else None
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict) and body.get("resourceType") == kind and body.get("id"):
            return body
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        parts = (location or "").split("/_history/")[0].rstrip("/").split("/")
        if len(parts) < 2 or parts[-2] != kind:
            raise RegistryError(
                f"the OMI registry at {self.base_url} stored a {kind} without saying its id"
            )
        return await self._get(f"/{kind}/{parts[-1]}", None, kind=kind)

    async def _get(
        self, url: str, params: Mapping[str, Any] | None, *, kind: str = "Bundle"
    ) -> dict[str, Any]:
        try:
            async with self._client.stream("GET", url, params=params) as response:
                if response.status_code != 200:
                    raise RegistryError(
                        f"the OMI registry at {self.base_url} answered HTTP {response.status_code}",
                        retryable=response.status_code >= 500 or response.status_code == 429,
                        status=response.status_code,
                    )
                # Read up to the bound, never whole: a registry's answer is not trusted.
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_PAGE_BYTES:
                        raise RegistryError(
                            f"the OMI registry at {self.base_url} sent an answer larger than "
                            f"{MAX_PAGE_BYTES} bytes; it was not read further"
                        )
        except httpx.HTTPError as exc:  # unreachable, or an answer httpx cannot read
            raise RegistryError(
                f"the OMI registry at {self.base_url} is unreachable: {exc}", retryable=True
            ) from exc
        try:
            bundle = json.loads(body)
        except ValueError as exc:
            raise RegistryError(f"the OMI registry at {self.base_url} sent no JSON") from exc
        except RecursionError:
            raise RegistryError(
                f"the OMI registry at {self.base_url} sent JSON nested too deeply"
            ) from None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != kind:
            shown = "search Bundle" if kind == "Bundle" else kind
            raise RegistryError(f"the OMI registry at {self.base_url} sent no {shown}")
        return bundle


def _objects(value: object) -> list[dict[str, Any]]:
    """The JSON objects of a JSON array; nothing for anything else."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _matching(
    services: Iterable[InferenceService],
    model_name: str | None,
    organization: str | None,
    query: ServiceQuery | None = None,
) -> list[InferenceService]:
    return [
        service
        for service in services
        if (model_name is None or service.model_name == model_name)
        and (organization is None or service.organization == organization)
        and (query is None or service.offers(query))
    ]


def _extension(resource: Mapping[str, Any], url: str) -> Mapping[str, Any] | None:
    return next((e for e in resource.get("extension") or () if e.get("url") == url), None)


def _extension_reference(resource: Mapping[str, Any], url: str) -> str | None:
    extension = _extension(resource, url)
    if extension is None:
        return None
    reference = extension.get("valueReference", {}).get("reference")
    return str(reference) if reference else None


def _service_from(
    resource: Mapping[str, Any], by_ref: Mapping[str, Mapping[str, Any]]
) -> InferenceService | None:
    """The service, or None (logged) when it lacks an OIP endpoint or a model name."""
    service_id = str(resource.get("id"))
    endpoint = next(
        (
            by_ref[ref["reference"]]
            for ref in resource.get("endpoint") or ()
            if ref.get("reference") in by_ref and _is_oip(by_ref[ref["reference"]])
        ),
        None,
    )
    device_ref = _extension_reference(resource, ALGORITHM_EXTENSION)
    device = by_ref.get(device_ref or "")
    model_name = _model_name(device) if device is not None else None
    if endpoint is None or model_name is None or endpoint.get("status", "active") != "active":
        _log.warning("registry.service_skipped", service_id=service_id)
        return None
    organization = None
    provided_by = resource.get("providedBy", {})
    org = by_ref.get(str(provided_by.get("reference")))
    for identifier in (org or {}).get("identifier") or [provided_by.get("identifier") or {}]:
        if identifier.get("system") == DSF_ORGANIZATION_IDENTIFIER_SYSTEM:
            organization = identifier.get("value")
    device_reference: dict[str, Any] = {"reference": device_ref, "type": "Device"}
    contract, problem = None, None
    try:
        contract = contract_from_device(device or {})
    except ContractError as exc:
        problem = str(exc)
        _log.warning("registry.contract_refused", service_id=service_id, reason=problem)
    return InferenceService(
        service_id=service_id,
        name=str(resource.get("name") or service_id),
        model_name=model_name,
        inference_url=str(endpoint["address"]),
        organization=organization,
        model_version=(device or {}).get("version", [{}])[0].get("value"),
        device=device_reference,
        heartbeat=_heartbeat(resource),
        modalities=_codes(resource.get("characteristic"), MODALITY_SYSTEM),
        body_parts=_codes(resource.get("characteristic"), BODY_PART_SYSTEM),
        tasks=_codes(resource.get("type"), TASK_SYSTEM),
        offered_as=_offered_as(resource, organization),
        contract=contract,
        contract_problem=problem,
    )


def _offered_as(resource: Mapping[str, Any], organization: str | None) -> str | None:
    """The catalogue id in the service's identifier ``<organization>/<id>``, when the
    organization is the one that provides it."""
    for identifier in resource.get("identifier") or ():
        value = str(identifier.get("value") or "")
        if identifier.get("system") == SERVICE_IDENTIFIER_SYSTEM and organization:
            head, _, tail = value.partition("/")
            if head == organization and tail:
                return tail
    return None


def _codes(concepts: object, system: str) -> tuple[str, ...]:
    """The codes of ``system`` in a list of CodeableConcepts, in order."""
    found: list[str] = []
    for concept in concepts if isinstance(concepts, list) else ():
        for coding in (concept.get("coding") or ()) if isinstance(concept, dict) else ():
            if coding.get("system") == system and coding.get("code"):
                found.append(str(coding["code"]))
    return tuple(found)


def _is_oip(endpoint: Mapping[str, Any]) -> bool:
    coding = endpoint.get("connectionType") or {}
    return (coding.get("system"), coding.get("code")) == OIP_CONNECTION_TYPE and bool(
        endpoint.get("address")
    )


def _model_name(device: Mapping[str, Any]) -> str | None:
    for name in device.get("deviceName") or ():
        if name.get("type") == "model-name" and name.get("name"):
            return str(name["name"])
    return None


def _heartbeat(resource: Mapping[str, Any]) -> Heartbeat | None:
    extension = _extension(resource, HEARTBEAT_EXTENSION)
    if extension is None:
        return None
    parts = {e.get("url"): e for e in extension.get("extension") or ()}
    status = str(parts.get("status", {}).get("valueCode", "unavailable"))
    if status not in _STATUSES:
        status = "unavailable"  # an unknown status is no promise to take work
    queue = parts.get("queueLength", {}).get("valueInteger")
    waiting = parts.get("estimatedWaitingTime", {}).get("valueDuration")
    seen = parts.get("lastSeen", {}).get("valueInstant")
    last_seen = dt.datetime.fromisoformat(seen) if seen else None
    if last_seen is not None and last_seen.utcoffset() is None:
        # A FHIR instant has a zone; a naive time cannot be compared with now (a TypeError in
        # every heartbeat check): a malformed service, as for a lastSeen that is no time.
        raise ValueError("the heartbeat's lastSeen has no time zone: it is no FHIR instant")
    return Heartbeat(
        status=status,
        queue_length=int(queue) if queue is not None else None,
        estimated_waiting_time=_duration(waiting),
        last_seen=last_seen,
    )


def heartbeat_extension(beat: Heartbeat) -> dict[str, Any]:
    """The heartbeat extension of a HealthcareService (what :func:`_heartbeat` reads)."""
    parts: list[dict[str, Any]] = [{"url": "status", "valueCode": beat.status}]
    if beat.queue_length is not None:
        parts.append({"url": "queueLength", "valueInteger": beat.queue_length})
    if beat.estimated_waiting_time is not None:
        seconds = round(beat.estimated_waiting_time.total_seconds(), 1)
        parts.append(
            {
                "url": "estimatedWaitingTime",
                "valueDuration": {
                    "value": seconds,
                    "unit": "s",
                    "system": "http://unitsofmeasure.org",
                    "code": "s",
                },
            }
        )
    if beat.last_seen is not None:
        seen = beat.last_seen.astimezone(dt.UTC).isoformat(timespec="milliseconds")
        parts.append({"url": "lastSeen", "valueInstant": seen})
    return {"url": HEARTBEAT_EXTENSION, "extension": parts}


def _duration(value: Mapping[str, Any] | None) -> dt.timedelta | None:
    if not value or value.get("value") is None:
        return None
    factor = {"s": 1, "min": 60, "h": 3600}.get(str(value.get("code", "s")), 1)
    return dt.timedelta(seconds=float(value["value"]) * factor)
