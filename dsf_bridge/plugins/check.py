"""``dsf-bridge plugins check``: validate plugin BPMN models and FHIR resources offline.

A path is a BPMN file, a FHIR resource file (XML or JSON) or a folder searched recursively. For
each file, after placeholder substitution (``#{version}``, ``#{date}``, ``#{organization}``,
``#{some.property}`` from the environment):

- BPMN: parsed safely, every element in the supported subset, validated as the DSF BPE does on
  plugin load (:mod:`dsf_bridge.engine.validation`); the warnings Camunda's parser gives for a
  model it accepts are listed too (:mod:`dsf_bridge.engine.structure`), without failing it;
- FHIR: read safely (XML without DTDs), ``${property:default}`` placeholders resolved too,
  validated with the ``fhir.resources`` R4B models, and ActivityDefinitions checked for a
  well-formed ``extension-process-authorization`` per message name: message-name, task-profile,
  requester and recipient codings from the process-authorization CodeSystem, each with the
  detail extension its code needs (organization identifier, parent organization and role,
  practitioner role). DSF 1.x and 2.x use the same structure and codes.

Files are bounded before they are parsed: 10 MB at most, JSON nested at most
:data:`MAX_JSON_DEPTH` levels (objects and arrays; the limit of the R4B models' JSON parser),
XML at most 256 levels (lxml's own limit). A file beyond a bound is reported invalid with the
reason, never a traceback.

In a folder, ``*.bpmn`` files are checked, and ``*.xml``/``*.json`` files when they are FHIR
resources (root in the FHIR namespace, or a ``resourceType``); other files are skipped, as are
DSF's ``.post`` criteria files. A file named explicitly is always checked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date as date_type
from pathlib import Path
from typing import Any

from lxml import etree
from pydantic import ValidationError

from dsf_bridge.engine import parse_bpmn, validate_document
from dsf_bridge.engine.safexml import MAX_XML_BYTES, parse_xml
from dsf_bridge.engine.structure import structure_warnings
from dsf_bridge.errors import BridgeError
from dsf_bridge.plugins.placeholders import Placeholders

__all__ = [
    "DEFAULT_ORGANIZATION",
    "DEFAULT_VERSION",
    "MAX_JSON_DEPTH",
    "CheckReport",
    "FileReport",
    "check_authorization",
    "check_paths",
]

DEFAULT_VERSION = "1.0"
DEFAULT_ORGANIZATION = "organization.example.org"
FHIR_NS = "http://hl7.org/fhir"
BPMN_NS = b"http://www.omg.org/spec/BPMN/20100524/MODEL"

AUTHORIZATION_URL = "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization"
AUTHORIZATION_SYSTEM = "http://dsf.dev/fhir/CodeSystem/process-authorization"
ORGANIZATION_IDENTIFIER = "http://dsf.dev/sid/organization-identifier"
_SD = "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization-"
# Which detail extension each authorization code needs on its coding (None: none allowed).
_CODE_DETAIL: dict[str, str | None] = {
    "LOCAL_ALL": None,
    "REMOTE_ALL": None,
    "LOCAL_ALL_PRACTITIONER": _SD + "practitioner",
    "LOCAL_ORGANIZATION": _SD + "organization",
    "REMOTE_ORGANIZATION": _SD + "organization",
    "LOCAL_ORGANIZATION_PRACTITIONER": _SD + "organization-practitioner",
    "LOCAL_ROLE": _SD + "parent-organization-role",
    "REMOTE_ROLE": _SD + "parent-organization-role",
    "LOCAL_ROLE_PRACTITIONER": _SD + "parent-organization-role-practitioner",
}
_RECIPIENT_CODES = {"LOCAL_ALL", "LOCAL_ORGANIZATION", "LOCAL_ROLE"}
_PROCESS_URL = re.compile(r"^https?://[^/]+/bpe/Process/[-a-zA-Z0-9]+$")

MAX_JSON_DEPTH = 200
"""Objects and arrays nested in a JSON file, at most. pydantic-core, which validates the R4B
models, refuses deeper JSON anyway, and Python's ``json`` recurses once per level (a few
thousand levels end in ``RecursionError``); real DSF resources stay below 20."""
# Outside strings: the next bracket or string; inside one: the rest of it up to its closing quote.
_JSON_SPECIAL = re.compile(rb'[\[\]{}"]')
_JSON_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"')
# lxml's message when a document is nested deeper than it parses without XML_PARSE_HUGE.
_LXML_DEPTH = "Excessive depth in document"


@dataclass
class FileReport:
    """The verdict on one file."""

    path: str
    kind: str
    resource_type: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """The verdict, then one indented line per warning (a valid file may have some)."""
        label = self.resource_type or self.kind
        if self.valid:
            verdict = f"valid    {self.path} ({label})"
        else:
            verdict = f"INVALID  {self.path} ({label}): " + "; ".join(self.problems)
        return "\n".join([verdict, *(f"  warning: {warning}" for warning in self.warnings)])

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["valid"] = self.valid
        return data


@dataclass
class CheckReport:
    """All files checked; ``ok`` only if every one is valid and at least one was checked."""

    files: list[FileReport]
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.files) and all(report.valid for report in self.files)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": len(self.files),
            "invalid": sum(1 for report in self.files if not report.valid),
            "files": [report.as_json() for report in self.files],
            "skipped": self.skipped,
        }


def check_paths(
    paths: Sequence[Path],
    *,
    version: str = DEFAULT_VERSION,
    date: str | None = None,
    organization: str = DEFAULT_ORGANIZATION,
    environment: Mapping[str, str] | None = None,
) -> CheckReport:
    """Check files and folders; see the module docstring for what is checked."""
    placeholders = Placeholders(
        version=version,
        date=date or date_type.today().isoformat(),
        organization=organization,
        environment=dict(os.environ) if environment is None else environment,
    )
    report = CheckReport([])
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    _check_file(child, placeholders, report, explicit=False)
        elif path.is_file():
            _check_file(path, placeholders, report, explicit=True)
        else:
            report.files.append(FileReport(str(path), "missing", None, ["no such file or folder"]))
    return report


def _check_file(path: Path, values: Placeholders, report: CheckReport, *, explicit: bool) -> None:
    suffix = path.suffix.lower()
    if suffix not in (".bpmn", ".xml", ".json"):
        if explicit:
            report.files.append(
                FileReport(str(path), "unknown", None, ["not a .bpmn, .xml or .json file"])
            )
        else:
            report.skipped.append(str(path))
        return
    size = path.stat().st_size
    if size > MAX_XML_BYTES:
        report.files.append(
            FileReport(str(path), suffix[1:], None, [f"file is {size} bytes, over the limit"])
        )
        return
    data = path.read_bytes()
    if suffix == ".json" and _json_too_deep(data):
        # Unparsed, the file cannot say whether it is a FHIR resource; a folder's other JSON
        # files (package.json) are skipped as usual unless they mention a resourceType.
        if explicit or b'"resourceType"' in data:
            problem = f"nested deeper than {MAX_JSON_DEPTH} levels (objects and arrays)"
            report.files.append(FileReport(str(path), "fhir-json", None, [problem]))
        else:
            report.skipped.append(str(path))
        return
    try:
        _check_parsed(path, data, values, report, explicit=explicit)
    except RecursionError:
        # The bounds above should make this unreachable; a traceback would be worse.
        report.files.append(
            FileReport(str(path), suffix[1:], None, ["nested too deeply to be checked"])
        )


def _json_too_deep(data: bytes) -> bool:
    """Whether brackets nest deeper than :data:`MAX_JSON_DEPTH`, in one linear pass that
    skips strings (each is matched once, so no input makes it quadratic)."""
    depth = 0
    position = 0
    while found := _JSON_SPECIAL.search(data, position):
        char = found.group()
        position = found.end()
        if char == b'"':
            rest = _JSON_STRING_REST.match(data, position)
            if rest is None:
                return False  # an unterminated string: the parser reports it
            position = rest.end()
        elif char in (b"{", b"["):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _xml_problem(message: str) -> str:
    if _LXML_DEPTH in message:
        return f"nested deeper than 256 levels (lxml's limit): {message}"
    return message


def _check_parsed(
    path: Path, data: bytes, values: Placeholders, report: CheckReport, *, explicit: bool
) -> None:
    suffix = path.suffix.lower()
    if suffix == ".bpmn" or (suffix == ".xml" and BPMN_NS in data[:2048]):
        report.files.append(_check_bpmn(path, data, values))
        return
    file_report = _check_fhir(path, data, values, explicit=explicit)
    if file_report is None:
        report.skipped.append(str(path))
    else:
        report.files.append(file_report)


def _check_bpmn(path: Path, data: bytes, values: Placeholders) -> FileReport:
    file_report = FileReport(str(path), "bpmn", "BPMN")
    try:
        substituted = values.replace_bytes(data, source=str(path))
        document = parse_bpmn(substituted, str(path))
        process = validate_document(document, values.version)
        file_report.resource_type = f"BPMN {process.key}"
        file_report.warnings = structure_warnings(process)
    except BridgeError as exc:
        file_report.problems.append(_xml_problem(exc.message))
    except UnicodeDecodeError as exc:
        file_report.problems.append(f"not UTF-8: {exc}")
    return file_report


def _resource_type_xml(data: bytes, source: str) -> tuple[str | None, bytes]:
    root = parse_xml(data, source)
    tag: object = root.tag
    if not isinstance(tag, str) or not tag.startswith("{" + FHIR_NS + "}"):
        return None, data
    return tag[len(FHIR_NS) + 2 :], data


def _check_fhir(
    path: Path, data: bytes, values: Placeholders, *, explicit: bool
) -> FileReport | None:
    kind = "fhir-xml" if path.suffix.lower() == ".xml" else "fhir-json"
    file_report = FileReport(str(path), kind)
    try:
        substituted = values.replace_fhir_bytes(data, source=str(path))
        if kind == "fhir-xml":
            resource_type, _ = _resource_type_xml(substituted, str(path))
        else:
            parsed = json.loads(substituted)
            value = parsed.get("resourceType") if isinstance(parsed, dict) else None
            resource_type = value if isinstance(value, str) else None
    except BridgeError as exc:
        file_report.problems.append(_xml_problem(exc.message))
        return file_report
    except (ValueError, UnicodeDecodeError) as exc:
        if not explicit and kind == "fhir-json":
            return None
        file_report.problems.append(f"unreadable: {exc}")
        return file_report
    if resource_type is None:
        if not explicit:
            return None  # a pom.xml or package.json in a plugin folder is no resource
        file_report.problems.append("not a FHIR resource (no FHIR root element/resourceType)")
        return file_report
    file_report.resource_type = resource_type
    model = _validate_model(resource_type, substituted, kind, file_report)
    if model is not None and resource_type == "ActivityDefinition":
        file_report.problems.extend(check_authorization(model))
    return file_report


def _validate_model(
    resource_type: str, data: bytes, kind: str, file_report: FileReport
) -> Any | None:
    # Imported here: the R4B model package is large and only this command needs it.
    from fhir.resources.R4B import get_fhir_model_class  # noqa: PLC0415

    try:
        model_class = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        file_report.problems.append(f"unknown FHIR R4 resource type {resource_type!r}")
        return None
    try:
        if kind == "fhir-xml":
            return model_class.model_validate_xml(data)
        return model_class.model_validate_json(data)
    except ValidationError as exc:
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error["loc"]) or resource_type
            file_report.problems.append(f"{where}: {error['msg']}")
        return None
    except (ValueError, TypeError, etree.LxmlError) as exc:
        file_report.problems.append(f"not a valid {resource_type}: {exc}")
        return None


def check_authorization(activity: Any) -> list[str]:
    """Problems of the process-authorization extensions of a validated ActivityDefinition."""
    problems: list[str] = []
    url = getattr(activity, "url", None)
    if not url or not _PROCESS_URL.match(str(url)):
        problems.append(f"url {url!r} is not http(s)://<domain>/bpe/Process/<name>")
    authorizations = [
        extension for extension in (activity.extension or []) if extension.url == AUTHORIZATION_URL
    ]
    if not authorizations:
        problems.append("no extension-process-authorization")
    seen: set[str] = set()
    for index, authorization in enumerate(authorizations, start=1):
        label = f"process-authorization #{index}"
        parts: dict[str, list[Any]] = {}
        for part in authorization.extension or []:
            parts.setdefault(part.url, []).append(part)
        unknown = sorted(set(parts) - {"message-name", "task-profile", "requester", "recipient"})
        if unknown:
            problems.append(f"{label}: unknown sub-extension(s) {', '.join(unknown)}")
        names = [part.valueString for part in parts.get("message-name", [])]
        if len(names) != 1 or not (names[0] or "").strip():
            problems.append(f"{label}: needs exactly one non-blank message-name")
        else:
            label = f"process-authorization {names[0]!r}"
            if names[0] in seen:
                problems.append(f"{label}: message-name authorized twice")
            seen.add(names[0])
        profiles = [part.valueCanonical for part in parts.get("task-profile", [])]
        if len(profiles) != 1 or not (profiles[0] or "").strip():
            problems.append(f"{label}: needs exactly one task-profile canonical")
        for role in ("requester", "recipient"):
            entries = parts.get(role, [])
            if not entries:
                problems.append(f"{label}: needs at least one {role}")
            for entry in entries:
                problems.extend(_check_coding(label, role, entry.valueCoding))
    return problems


def _check_coding(label: str, role: str, coding: Any) -> list[str]:
    if coding is None:
        return [f"{label}: {role} needs a valueCoding"]
    if coding.system != AUTHORIZATION_SYSTEM:
        return [f"{label}: {role} coding system {coding.system!r} is not {AUTHORIZATION_SYSTEM}"]
    code = coding.code
    if code not in _CODE_DETAIL:
        return [f"{label}: {role} code {code!r} is not a process-authorization code"]
    if role == "recipient" and code not in _RECIPIENT_CODES:
        return [f"{label}: recipient code {code!r} is not allowed for recipients"]
    detail = _CODE_DETAIL[code]
    extensions = list(coding.extension or [])
    urls = [extension.url for extension in extensions]
    if detail is None and urls:
        return [f"{label}: {role} {code} takes no extension"]
    if detail is not None and urls != [detail]:
        return [f"{label}: {role} {code} needs exactly one extension {detail}"]
    if detail is None:
        return []
    problem = _check_detail(detail[len(_SD) :], extensions[0])
    return [f"{label}: {role} {code}: {problem}"] if problem else []


def _identifier_ok(identifier: Any) -> bool:
    return (
        identifier is not None
        and identifier.system == ORGANIZATION_IDENTIFIER
        and bool((identifier.value or "").strip())
    )


def _coding_ok(coding: Any) -> bool:
    return coding is not None and bool(coding.system) and bool((coding.code or "").strip())


def _check_detail(kind: str, extension: Any) -> str | None:
    """The value of a detail extension, as its StructureDefinition requires."""
    parts = {part.url: part for part in (extension.extension or [])}
    if kind == "organization":
        ok = _identifier_ok(extension.valueIdentifier)
        return None if ok else "needs valueIdentifier with system " + ORGANIZATION_IDENTIFIER
    if kind == "practitioner":
        return (
            None if _coding_ok(extension.valueCoding) else "needs a practitioner-role valueCoding"
        )
    if kind == "organization-practitioner":
        organization = parts.get("organization")
        practitioner = parts.get("practitioner-role")
        if organization is None or not _identifier_ok(organization.valueIdentifier):
            return "needs an organization sub-extension with an organization identifier"
        if practitioner is None or not _coding_ok(practitioner.valueCoding):
            return "needs a practitioner-role sub-extension with a coding"
        return None
    parent = parts.get("parent-organization")
    role = parts.get("organization-role")
    if parent is None or not _identifier_ok(parent.valueIdentifier):
        return "needs a parent-organization sub-extension with an organization identifier"
    if role is None or not _coding_ok(role.valueCoding):
        return "needs an organization-role sub-extension with a coding"
    if kind.endswith("-practitioner"):
        practitioner = parts.get("practitioner-role")
        if practitioner is None or not _coding_ok(practitioner.valueCoding):
            return "needs a practitioner-role sub-extension with a coding"
    return None
