"""DSF's fixed vocabulary: naming systems, CodeSystems, extension URLs and media types, plus the
small OperationOutcome helpers both the client and the sandbox need.

One place for these strings, so a typo in a canonical URL cannot hide in one caller.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = [
    "BPMN_MESSAGE_SYSTEM",
    "ENDPOINT_IDENTIFIER_SYSTEM",
    "FHIR_JSON",
    "FHIR_XML",
    "ORGANIZATION_IDENTIFIER_SYSTEM",
    "ORGANIZATION_ROLE_SYSTEM",
    "PROCESS_AUTHORIZATION_EXTENSION",
    "PROCESS_AUTHORIZATION_SYSTEM",
    "QUESTIONNAIRE_RESPONSE_PROFILE",
    "TASK_IDENTIFIER_SYSTEM",
    "THUMBPRINT_EXTENSION",
    "operation_outcome",
    "outcome_diagnostics",
    "parse_instant",
]

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"

ORGANIZATION_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/organization-identifier"
ENDPOINT_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/endpoint-identifier"
TASK_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/task-identifier"
PRACTITIONER_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/practitioner-identifier"

THUMBPRINT_EXTENSION = "http://dsf.dev/fhir/StructureDefinition/extension-certificate-thumbprint"
PROCESS_AUTHORIZATION_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization"
)
PROCESS_AUTHORIZATION_ORGANIZATION_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization-organization"
)
PROCESS_AUTHORIZATION_PARENT_ORGANIZATION_ROLE_EXTENSION = "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization-parent-organization-role"
PROCESS_AUTHORIZATION_SYSTEM = "http://dsf.dev/fhir/CodeSystem/process-authorization"
ORGANIZATION_ROLE_SYSTEM = "http://dsf.dev/fhir/CodeSystem/organization-role"
BPMN_MESSAGE_SYSTEM = "http://dsf.dev/fhir/CodeSystem/bpmn-message"
QUESTIONNAIRE_RESPONSE_PROFILE = "http://dsf.dev/fhir/StructureDefinition/questionnaire-response"
READ_ACCESS_TAG_SYSTEM = "http://dsf.dev/fhir/CodeSystem/read-access-tag"
READ_ACCESS_ORGANIZATION_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-read-access-organization"
)
READ_ACCESS_PARENT_ORGANIZATION_ROLE_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-read-access-parent-organization-role"
)


def parse_instant(value: object) -> dt.datetime | None:
    """A FHIR ``instant``/``dateTime`` string as an aware datetime (UTC when it names no time
    zone); ``None`` for anything that is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def operation_outcome(
    diagnostics: str, *, severity: str = "error", code: str = "processing"
) -> dict[str, Any]:
    """An OperationOutcome with one issue, as DSF returns them."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def outcome_diagnostics(outcome: dict[str, Any]) -> str:
    """The human-readable text of an OperationOutcome's issues, joined by ``; ``."""
    texts: list[str] = []
    issues = outcome.get("issue")
    for issue in issues if isinstance(issues, list) else []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics")
        if not text:
            details = issue.get("details")
            text = details.get("text") if isinstance(details, dict) else None
        if text:
            texts.append(str(text))
    return "; ".join(texts)
