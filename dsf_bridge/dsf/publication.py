"""Publishing the plugins' FHIR resources to the local DSF FHIR server at start-up.

As the DSF BPE does it: one batch Bundle of conditional creates, ``If-None-Exist`` by
``url`` and ``version`` for definitional resources (ActivityDefinition, StructureDefinition,
CodeSystem, ValueSet, NamingSystem, Questionnaire, Library, Measure) and by the
``task-identifier`` for draft Tasks, so publishing again changes nothing. Placeholders are
already replaced by the plugin loader. Resources that say ``status unknown`` ("status managed by
bpe") are published ``active`` for the processes the bridge runs (``draft`` or ``retired`` on
request).

Plugins are written against DSF 1.x (API v1: ``task-base``); for a DSF 2.x server they are
rewritten first, as the Java 2.x BPE rewrites API v1 plugins (:func:`for_dsf_2`).

Plugins ship XML; it is read with ``fhir.resources`` (R4B models, which read DSF's R4 files)
into JSON, the bridge's wire format.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import TASK_IDENTIFIER_SYSTEM
from dsf_bridge.engine.safexml import parse_xml
from dsf_bridge.errors import BridgeError, ProcessModelError

__all__ = [
    "PublicationError",
    "PublishedResource",
    "for_dsf_2",
    "publication_bundle",
    "publish",
    "read_resource",
]

log = structlog.get_logger("dsf_bridge.publication")

_FHIR_NS = "{http://hl7.org/fhir}"


class PublicationError(BridgeError):
    """The FHIR server refused a plugin resource; the message names it and says why."""


@dataclass(frozen=True)
class PublishedResource:
    source: str
    resource_type: str
    criteria: str
    status: str


def _strip_comments(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if k != "fhir_comments"}
    if isinstance(node, list):
        return [_strip_comments(v) for v in node]
    return node


def read_resource(source: str | Path, data: bytes) -> dict[str, Any]:
    """A plugin resource file (XML or JSON, placeholders replaced) as a FHIR JSON object."""
    name = str(source)
    if name.lower().endswith(".json"):
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ProcessModelError(f"{name}: not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict) or "resourceType" not in parsed:
            raise ProcessModelError(f"{name}: not a FHIR resource")
        return parsed
    root = parse_xml(data, name)  # entities, DTDs and network off
    resource_type = str(root.tag).removeprefix(_FHIR_NS)
    try:
        model = get_fhir_model_class(resource_type)
        resource = model.model_validate_xml(data)
    except (KeyError, ValueError, ValidationError) as exc:
        raise ProcessModelError(f"{name}: not a valid FHIR {resource_type}: {exc}") from exc
    result: dict[str, Any] = _strip_comments(resource.model_dump(mode="json", exclude_none=True))
    result["resourceType"] = resource_type
    if resource_type == "StructureDefinition":
        _restore_element_ids(root, result)
    return result


def _restore_element_ids(root: Any, resource: dict[str, Any]) -> None:
    """Put back the ``id`` attributes of ElementDefinitions, which ``fhir.resources`` drops
    when it reads XML: without them slices of slices (``Task.input:x.value[x]``) are ambiguous
    and the published profile differs from the plugin's file."""
    for part in ("differential", "snapshot"):
        elements = (resource.get(part) or {}).get("element") or []
        nodes = root.findall(f"{_FHIR_NS}{part}/{_FHIR_NS}element")
        if len(nodes) != len(elements):
            continue  # pragma: no cover - the model keeps every element
        for node, element in zip(nodes, elements, strict=True):
            if node.get("id") and "id" not in element:
                element["id"] = node.get("id")


_SD = "http://dsf.dev/fhir/StructureDefinition/"
_CS = "http://dsf.dev/fhir/CodeSystem/"
# The DSF core profile a 2.x server requires in meta.profile, by resource type, and the
# versioned 1.x profiles it replaces (ProcessPluginImpl of dsf-bpe-process-api-v1-impl, 2.x).
_DSF_2_PROFILES: Mapping[str, tuple[str | None, tuple[str, ...]]] = {
    "ActivityDefinition": (f"{_SD}activity-definition", ("1.0.0",)),
    "CodeSystem": (f"{_SD}code-system", ("1.0.0",)),
    "Library": (f"{_SD}library", ()),
    "Measure": (f"{_SD}measure", ()),
    "NamingSystem": (f"{_SD}naming-system", ()),
    "ValueSet": (f"{_SD}value-set", ("1.0.0",)),
    "StructureDefinition": (f"{_SD}structure-definition", ()),
    # No profile is prepended to a Questionnaire; its 1.x versions are dropped.
    "Questionnaire": (None, ("1.0.0", "1.5.0")),
}
_TASK_BASE = f"{_SD}task-base"
_UNVERSIONED_BINDINGS = tuple(
    f"{_CS}{name}"
    for name in (
        "bpmn-message",
        "organization-role",
        "practitioner-role",
        "process-authorization",
        "read-access-tag",
    )
)
_QUESTIONNAIRE_REQUIRED_ITEMS = frozenset({"business-key", "user-task-id"})


def for_dsf_2(resource: Mapping[str, Any]) -> dict[str, Any]:
    """An API v1 plugin resource as the Java 2.x BPE rewrites it for a DSF 2.x FHIR server.

    As ``ProcessPluginImpl`` of ``dsf-bpe-process-api-v1-impl`` does: the DSF core profile goes
    first into ``meta.profile`` (versioned 1.x core profiles become unversioned); a
    StructureDefinition derived from ``task-base`` derives from ``task``, and its bindings to
    DSF CodeSystems lose their version; a Questionnaire's items get ``required`` (true for
    ``business-key`` and ``user-task-id``). Tasks and everything else stay as they are.
    """
    rewritten = copy.deepcopy(dict(resource))
    resource_type = str(rewritten.get("resourceType"))
    if resource_type in _DSF_2_PROFILES:
        core, old_versions = _DSF_2_PROFILES[resource_type]
        meta = rewritten.setdefault("meta", {})
        profiles: list[str] = []
        for profile in [core, *(meta.get("profile") or [])]:
            if profile is None:
                continue
            base, _, version = str(profile).partition("|")
            unversioned = version in old_versions and base == (core or f"{_SD}questionnaire")
            kept = base if unversioned else str(profile)
            if kept not in profiles:
                profiles.append(kept)
        if profiles:
            meta["profile"] = profiles
    if resource_type == "StructureDefinition":
        if str(rewritten.get("baseDefinition", "")).partition("|")[0] == _TASK_BASE:
            rewritten["baseDefinition"] = f"{_SD}task"
        for element in (rewritten.get("differential") or {}).get("element") or []:
            binding = element.get("binding") or {}
            value_set = str(binding.get("valueSet", ""))
            base, _, version = value_set.partition("|")
            if base in _UNVERSIONED_BINDINGS and version in ("1.0.0", "2.0.0"):
                binding["valueSet"] = base
    if resource_type == "Questionnaire":
        _set_required(rewritten.get("item") or [])
    return rewritten


def _set_required(items: list[dict[str, Any]]) -> None:
    # Exactly ProcessPluginImpl.setRequired: only items with linkId and type, not display, and
    # without "required" yet get it, and only their children are looked at.
    for item in items:
        if (
            not item.get("linkId")
            or not item.get("type")
            or item.get("type") == "display"
            or "required" in item
        ):
            continue
        item["required"] = item["linkId"] in _QUESTIONNAIRE_REQUIRED_ITEMS
        _set_required(item.get("item") or [])


def _criteria(resource: Mapping[str, Any], source: str) -> str:
    if resource["resourceType"] == "Task":
        for identifier in resource.get("identifier") or []:
            if identifier.get("system") == TASK_IDENTIFIER_SYSTEM and identifier.get("value"):
                return f"identifier={TASK_IDENTIFIER_SYSTEM}|{identifier['value']}"
        raise ProcessModelError(
            f"{source}: a draft Task needs a {TASK_IDENTIFIER_SYSTEM} identifier"
        )
    if not resource.get("url") or not resource.get("version"):
        raise ProcessModelError(f"{source}: {resource['resourceType']} needs url and version")
    return f"url={resource['url']}&version={resource['version']}"


def publication_bundle(
    resources: Iterable[tuple[str, Mapping[str, Any]]], *, status: str = "active"
) -> tuple[dict[str, Any], list[PublishedResource]]:
    """The batch Bundle of conditional creates for ``(source, resource)`` pairs."""
    entries: list[dict[str, Any]] = []
    published: list[PublishedResource] = []
    for source, original in resources:
        resource = dict(original)
        if resource.get("status") == "unknown":
            resource["status"] = status
        criteria = _criteria(resource, source)
        entries.append(
            {
                # DSF's CreateCommand answers 400 for a create entry without a urn:uuid fullUrl.
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": resource,
                "request": {
                    "method": "POST",
                    "url": resource["resourceType"],
                    "ifNoneExist": criteria,
                },
            }
        )
        published.append(
            PublishedResource(
                source, resource["resourceType"], criteria, str(resource.get("status"))
            )
        )
    return {"resourceType": "Bundle", "type": "batch", "entry": entries}, published


async def publish(
    client: FhirClient,
    resources: Iterable[tuple[str, bytes]],
    *,
    status: str = "active",
    dsf_release: DsfRelease = DSF_2,
) -> list[PublishedResource]:
    """Publish plugin resource files (API v1 style, as our plugins and the Java v1 plugins
    write them), rewritten for a 2.x server as the Java 2.x BPE does; raise
    :class:`PublicationError` naming any refused one."""
    parsed = [(source, read_resource(source, data)) for source, data in resources]
    if dsf_release.major >= 2:
        parsed = [(source, for_dsf_2(resource)) for source, resource in parsed]
    if not parsed:
        return []
    bundle, published = publication_bundle(parsed, status=status)
    answer = await client.bundle(bundle, return_minimal=True)
    refused = []
    for item, entry in zip(published, answer.get("entry") or [], strict=False):
        response = entry.get("response") or {}
        code = str(response.get("status", ""))
        if not code.startswith(("200", "201")):
            outcome = response.get("outcome") or {}
            issues = outcome.get("issue") or [{}]
            why = issues[0].get("diagnostics") or code
            refused.append(f"{item.source} ({item.resource_type}, {item.criteria}): {why}")
    if refused:
        raise PublicationError(
            "the FHIR server refused plugin resources: " + "; ".join(refused), retryable=False
        )
    log.info("resources.published", count=len(published))
    return published
