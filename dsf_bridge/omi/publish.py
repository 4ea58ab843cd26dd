"""The provider side of OMI: publishing this site's inference services in an OMI registry and
keeping their heartbeats current (``docs/omi.md``, "Publishing a service").

For each service the providing site offers (a catalogue entry with an ``inference_url``), three
resources, each found by its identifier ``<organization>/<catalogue id>``:

- a ``Device`` for the model (:func:`service_resources`): ``deviceName`` of type
  ``model-name`` and ``user-friendly-name`` (the contract's title), ``version``, and as
  ``property`` what it accepts and outputs;
- an ``Endpoint``: the Open Inference Protocol v2 base URL;
- a ``HealthcareService`` provided by the site's organization (by its DSF organization
  identifier), referencing both, with the accepted modalities and body parts as
  ``characteristic`` and its tasks as ``type`` (searchable: :class:`~.registry.ServiceQuery`),
  and the heartbeat extension.

Publishing is idempotent (:class:`RegistryPublisher`): a resource missing from the registry is
created conditionally (``If-None-Exist`` on its identifier), one that differs from what this
site declares is updated over the version it read (``If-Match``), one that matches is left
alone. The heartbeat is not part of that comparison; :meth:`RegistryPublisher.beat` replaces
it alone. Nothing published names a patient or a study: only the service, its model and the
site.

Errors: :class:`~.registry.RegistryError` when the registry fails (retryable for 5xx, 409,
412, 429 and connection errors) or holds the same identifier twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from dsf_bridge.omi.contract import InferenceContract
from dsf_bridge.omi.contract_resources import contract_elements
from dsf_bridge.omi.inference import HttpInferenceClient, InferenceError
from dsf_bridge.omi.registry import (
    ALGORITHM_EXTENSION,
    ANY_BODY_PART,
    BODY_PART_SYSTEM,
    DEVICE_IDENTIFIER_SYSTEM,
    DSF_ORGANIZATION_IDENTIFIER_SYSTEM,
    ENDPOINT_IDENTIFIER_SYSTEM,
    HEARTBEAT_EXTENSION,
    MODALITY_SYSTEM,
    OIP_CONNECTION_TYPE,
    SERVICE_IDENTIFIER_SYSTEM,
    TASK_SYSTEM,
    FhirRegistryClient,
    Heartbeat,
    RegistryError,
    heartbeat_extension,
)

__all__ = [
    "DEVICE_PROPERTY_SYSTEM",
    "Outcome",
    "PublishedResource",
    "RegistryPublisher",
    "ServiceOffer",
    "measure_heartbeat",
    "service_resources",
]

_log = structlog.get_logger()

#: Codes of ``Device.property.type``: what the model accepts and which outputs it has.
DEVICE_PROPERTY_SYSTEM = "http://omi.de/fhir/registry/CodeSystem/device-property"

Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class ServiceOffer:
    """One service this site offers: its catalogue entry and the contract it serves."""

    service_id: str
    name: str
    model_name: str
    inference_url: str
    contract: InferenceContract
    model_version: str | None = None

    def tasks(self) -> list[str]:
        """What the service does, by the outputs its contract declares."""
        outputs = self.contract.outputs
        return [
            task
            for task, declared in (
                ("measurement", outputs.measurements),
                ("classification", outputs.classifications),
                ("segmentation", outputs.label_maps),
            )
            if declared
        ]


@dataclass(frozen=True)
class PublishedResource:
    """What publishing did to one resource."""

    resource_type: str
    identifier: str
    id: str
    outcome: Outcome


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    return {"coding": [coding]}


def _property(code: str, values: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    # FHIR JSON has no empty arrays: a server drops one, and the comparison of what is
    # published with what is declared would then differ on every run.
    prop: dict[str, Any] = {"type": _concept(DEVICE_PROPERTY_SYSTEM, code)}
    if values:
        prop["valueCode"] = list(values)
    return prop


def service_resources(offer: ServiceOffer, organization: str) -> dict[str, dict[str, Any]]:
    """The ``Device``, ``Endpoint`` and ``HealthcareService`` of ``offer`` as this site declares
    them, without ids; the HealthcareService's references and heartbeat are added when they are
    published."""
    key = f"{organization}/{offer.service_id}"
    contract = offer.contract
    accepts = contract.accepts
    version = offer.model_version or contract.model.version
    modalities = [_concept(MODALITY_SYSTEM, modality) for modality in accepts.modality]
    body_parts = [_concept(BODY_PART_SYSTEM, part) for part in accepts.body_part or [ANY_BODY_PART]]
    outputs = [
        *(m.code.fhir() for m in contract.outputs.measurements),
        *(c.code.fhir() for c in contract.outputs.classifications),
    ]
    device: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": key}],
        "status": "active",
        "deviceName": [
            {"name": offer.model_name, "type": "model-name"},
            {"name": contract.title, "type": "user-friendly-name"},
        ],
        "owner": _organization(organization),
        "property": [
            _property("accepts-modality", modalities),
            _property("accepts-body-part", body_parts),
            _property("task", [_concept(TASK_SYSTEM, task) for task in offer.tasks()]),
            _property("output", [{"coding": [coding]} for coding in outputs]),
        ],
    }
    if version:
        device["version"] = [{"value": version}]
    # The full contract: the IG's input and output Parameters, contained, and the contract
    # itself with its SHA-256 for what the IG has no element for (contract_resources.py).
    device.update(contract_elements(contract))
    endpoint = {
        "resourceType": "Endpoint",
        "identifier": [{"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": key}],
        "status": "active",
        "connectionType": {"system": OIP_CONNECTION_TYPE[0], "code": OIP_CONNECTION_TYPE[1]},
        "name": f"{offer.name} (Open Inference Protocol v2)",
        "managingOrganization": _organization(organization),
        "payloadType": [{"text": "Open Inference Protocol v2"}],
        "address": offer.inference_url,
    }
    service = {
        "resourceType": "HealthcareService",
        "identifier": [{"system": SERVICE_IDENTIFIER_SYSTEM, "value": key}],
        "active": True,
        "providedBy": _organization(organization),
        "type": [_concept(TASK_SYSTEM, task) for task in offer.tasks()],
        "name": offer.name,
        "comment": contract.title,
        "characteristic": [*modalities, *body_parts],
    }
    return {"Device": device, "Endpoint": endpoint, "HealthcareService": service}


def _organization(identifier: str) -> dict[str, Any]:
    return {
        "identifier": {"system": DSF_ORGANIZATION_IDENTIFIER_SYSTEM, "value": identifier},
        "display": identifier,
    }


def _declared(resource: Mapping[str, Any]) -> dict[str, Any]:
    """What publishing compares: the resource without what the registry or the heartbeat
    change (id, meta, text, the heartbeat extension)."""
    kept = {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}
    extensions = [e for e in kept.pop("extension", []) if e.get("url") != HEARTBEAT_EXTENSION]
    if extensions:
        kept["extension"] = extensions
    return kept


class RegistryPublisher:
    """Publishes services to the registry ``client`` talks to, as ``organization``."""

    def __init__(self, client: FhirRegistryClient, organization: str) -> None:
        self.client = client
        self.organization = organization

    async def publish(self, offer: ServiceOffer) -> list[PublishedResource]:
        """Create or update the three resources of ``offer``; what happened to each."""
        declared = service_resources(offer, self.organization)
        device = await self._put(declared["Device"])
        endpoint = await self._put(declared["Endpoint"])
        service = declared["HealthcareService"]
        service["extension"] = [
            {"url": ALGORITHM_EXTENSION, "valueReference": {"reference": f"Device/{device.id}"}}
        ]
        service["endpoint"] = [{"reference": f"Endpoint/{endpoint.id}"}]
        healthcare = await self._put(service)
        published = [device, endpoint, healthcare]
        _log.info(
            "registry.published",
            service=offer.service_id,
            **{p.resource_type: p.outcome for p in published},
        )
        return published

    async def beat(self, offer: ServiceOffer, heartbeat: Heartbeat) -> None:
        """Replace the heartbeat of the service's published HealthcareService."""
        key = f"{self.organization}/{offer.service_id}"
        current = await self._find("HealthcareService", SERVICE_IDENTIFIER_SYSTEM, key)
        if current is None:
            raise RegistryError(
                f"service {offer.service_id} is not published in the OMI registry at "
                f"{self.client.base_url} (run 'dsf-bridge omi publish')"
            )
        extensions = [
            e for e in current.get("extension") or () if e.get("url") != HEARTBEAT_EXTENSION
        ]
        updated = {**current, "extension": [*extensions, heartbeat_extension(heartbeat)]}
        await self.client.update(updated, version=_version(current))

    async def _find(self, kind: str, system: str, value: str) -> dict[str, Any] | None:
        found = await self.client.search(kind, {"identifier": f"{system}|{value}"})
        # Checked here: a registry that ignored the search would otherwise have this site
        # update another site's resource.
        matches = [
            r
            for r in found
            if r.get("resourceType") == kind
            and isinstance(r.get("id"), str)
            and any(
                isinstance(i, dict) and i.get("system") == system and i.get("value") == value
                for i in _listed(r.get("identifier"))
            )
        ]
        if len(matches) > 1:
            raise RegistryError(
                f"the OMI registry at {self.client.base_url} holds {len(matches)} {kind} "
                f"resources with identifier {system}|{value}; remove all but one"
            )
        return matches[0] if matches else None

    async def _put(self, resource: dict[str, Any]) -> PublishedResource:
        kind = str(resource["resourceType"])
        identifier = resource["identifier"][0]
        system, value = str(identifier["system"]), str(identifier["value"])
        current = await self._find(kind, system, value)
        if current is None:
            stored = await self.client.create(
                resource, if_none_exist=f"identifier={system}|{value}"
            )
            outcome: Outcome = "created"
        elif _declared(current) == _declared(resource):
            stored, outcome = current, "unchanged"
        else:
            heartbeat = [
                e for e in current.get("extension") or () if e.get("url") == HEARTBEAT_EXTENSION
            ]
            update = {**resource, "id": current["id"]}
            if heartbeat:  # publishing declares the service; the heartbeat stays as it was
                update["extension"] = [*update.get("extension", []), *heartbeat]
            stored = await self.client.update(update, version=_version(current))
            outcome = "updated"
        return PublishedResource(kind, value, str(stored["id"]), outcome)


def _listed(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _version(resource: Mapping[str, Any]) -> str | None:
    version = (resource.get("meta") or {}).get("versionId")
    return str(version) if version is not None else None


async def measure_heartbeat(
    inference: HttpInferenceClient,
    offer: ServiceOffer,
    *,
    queue_length: int,
    recent_durations: Sequence[float],
    now: dt.datetime | None = None,
) -> Heartbeat:
    """The service's state now: ``unavailable`` unless its model answers ready (OIP v2
    ``/v2/models/{name}/ready``), then ``busy`` with a queue and ``available`` without; the
    estimated waiting time is the mean of the recent inference durations times the queue."""
    model = offer.model_name
    version = offer.model_version or offer.contract.model.version
    try:
        ready = await inference.model_ready(model, version)
    except InferenceError as exc:
        _log.warning("heartbeat.model_unreachable", service=offer.service_id, reason=str(exc))
        ready = False
    waiting: dt.timedelta | None = None
    if queue_length == 0:
        waiting = dt.timedelta(0)
    elif recent_durations:
        mean = sum(recent_durations) / len(recent_durations)
        waiting = dt.timedelta(seconds=mean * queue_length)
    status = "unavailable" if not ready else ("busy" if queue_length else "available")
    return Heartbeat(
        status=status,
        queue_length=queue_length,
        estimated_waiting_time=waiting,
        last_seen=now or dt.datetime.now(dt.UTC),
    )
