"""The bridge's audit events as FHIR R4 ``AuditEvent`` resources, after IHE BALP where it fits.

IHE's Basic Audit Log Patterns (BALP) describe RESTful interactions: ``type`` is
``rest`` with the interaction as ``subtype``, ``agent`` names who acted, ``source`` the
system that recorded it, ``entity`` what was touched. Our events are of two kinds:

- about a Task on a DSF FHIR server (``task.*``): ``type`` ``rest``, ``subtype`` the FHIR
  interaction (``create`` for a Task sent, ``update`` for a status set), the entity
  ``Task/<id>`` as a reference;
- about the engine (process instances, definitions, incidents, operators, the store):
  ``type`` DICOM's ``110100`` Application Activity, and the entity the instance (its UUID) or
  the process definition (``key|version``) as an identifier.

Every resource also carries the bridge's own action as a second ``subtype``
(``http://dsf-bridge.dev/fhir/CodeSystem/audit-action``), the reason as ``outcomeDesc``, and
the event's chain fields (sequence, hashes, payload digest, record) as ``entity.detail``, so an
exported trail can be checked against the store. The agent and the source are the site's
organization (its DSF organization identifier); the actor (a bridge process, an operator)
is the agent's name. No patient or study identifier is in an event, so none is in a resource.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM

__all__ = ["AUDIT_ACTION_SYSTEM", "audit_event_resource"]

AUDIT_ACTION_SYSTEM = "http://dsf-bridge.dev/fhir/CodeSystem/audit-action"
_AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
_DICOM = "http://dicom.nema.org/resources/ontology/DCM"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"

# Actions that end in failure: outcome 4 (minor failure) instead of 0 (success).
_FAILURES = ("failed", "refused", "skipped", "incident.created", "lost")
# BALP's action codes: Create, Read, Update, Delete, Execute.
_CREATES = ("task.sent", "instance.started", "process.deployed", "store.bound")


def _action_code(action: str) -> str:
    if action in _CREATES:
        return "C"
    if action.startswith("task.") or action.startswith("instance."):
        return "U"
    return "E"


def _entity(subject: str) -> dict[str, Any]:
    kind, _, value = subject.partition("/")
    if kind == "Task":
        return {
            "what": {"reference": subject},
            "type": {"system": _RESOURCE_TYPES, "code": "Task", "display": "Task"},
            "role": {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
        }
    if kind == "instance":
        what: dict[str, Any] = {
            "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{value}"},
            "display": f"process instance {value}",
        }
    elif kind == "Organization":
        what = {"identifier": {"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": value}}
    else:  # ProcessDefinition/<key>|<version> and whatever a later release adds
        what = {"display": subject}
    return {
        "what": what,
        "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
    }


def _details(event: Mapping[str, Any]) -> list[dict[str, str]]:
    details = []
    for name in ("sequence", "event_hash", "previous_hash", "payload_digest", "record"):
        value = event.get(name)
        if value is not None:
            details.append({"type": name, "valueString": str(value)})
    return details


def audit_event_resource(event: Mapping[str, Any], organization: str | None) -> dict[str, Any]:
    """One stored audit event (the keys of ``dsf-bridge audit export --format jsonl``) as an
    R4 ``AuditEvent``; ``organization``: the identifier of the site the store belongs to
    (``None`` before a bridge first ran on it)."""
    action = str(event["action"])
    subject = str(event["subject"])
    recorded = event["occurred_at"]
    if isinstance(recorded, dt.datetime):
        recorded = recorded.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    site: dict[str, Any] = (
        {"identifier": {"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": organization}}
        if organization
        else {"display": "dsf-bridge (organization not recorded yet)"}
    )
    if action.startswith("task."):
        kind = {"system": _AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
        interaction = "create" if action == "task.sent" else "update"
        subtypes = [{"system": _RESTFUL_INTERACTION, "code": interaction}]
    else:
        kind = {"system": _DICOM, "code": "110100", "display": "Application Activity"}
        subtypes = []
    subtypes.append({"system": AUDIT_ACTION_SYSTEM, "code": action})
    failed = action.endswith(_FAILURES)
    entity = _entity(subject)
    details = _details(event)
    if details:
        entity["detail"] = details
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"dsf-bridge-audit-{event['id']}",
        "type": kind,
        "subtype": subtypes,
        "action": _action_code(action),
        "recorded": recorded,
        "outcome": "4" if failed else "0",
        "agent": [
            {
                "type": {
                    "coding": [{"system": _DICOM, "code": "110150", "display": "Application"}]
                },
                "who": site,
                "name": str(event["actor"]),
                "requestor": True,
            }
        ],
        "source": {
            "site": organization or "dsf-bridge",
            "observer": site,
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": [entity],
    }
    if event.get("reason"):
        resource["outcomeDesc"] = str(event["reason"])
    return resource
