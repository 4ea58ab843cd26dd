"""Authorization as the DSF FHIR server does it: who may create and update which Task, judged by
the caller's organization (client-certificate thumbprint), the local organization and the
``extension-process-authorization`` of the ActivityDefinition a Task instantiates.

Facts taken from DSF's ``TaskAuthorizationRule`` and ``ProcessAuthorizationHelperImpl``
(datasharingframework/dsf, 2.x): a Task is created ``draft`` only by the local organization (with
a unique ``task-identifier``) or ``requested`` by any organization that is the Task's requester;
the recipient must be the local organization; ``instantiatesCanonical`` must match
``http(s)://<domain>/bpe/Process/<name>|<major.minor>``; exactly one non-empty ``message-name``
input; no outputs; and the ActivityDefinition with that URL and version (status draft or active)
must hold an authorization for the message name and one of the Task's profiles (exact, or the
Task's profile without version equal to the authorized one's base) whose requester and recipient
codings accept caller and local organization. Updates follow DSF's status transitions and are
made by the local organization only.

Identities are organizations (allow-list thumbprints) or practitioners of the local organization
(:class:`RoleConfig`, DSF's ``dev.dsf.fhir.server.roleConfig``: a client certificate's thumbprint
or e-mail -> DSF roles, the operations allowed per resource type, and practitioner roles). As
DSF 2.1 decides for a practitioner (``TaskAuthorizationRule``,
``QuestionnaireResponseAuthorizationRule``, ``TaskIdentityFilter``): a requested Task names it
as requester (``http://dsf.dev/sid/practitioner-identifier``, its e-mail) and needs a
``LOCAL_*_PRACTITIONER`` authorization with one of its practitioner roles; draft Tasks, Task
updates and QuestionnaireResponse creates, stops and amendments need ``DSF_ADMIN``, which also
passes every local process-authorization coding; a practitioner reads the Tasks it requested and
drafts (``DSF_ADMIN``: all Tasks of the local organization) and the QuestionnaireResponses whose
``extension-questionnaire-authorization`` names it or one of its roles (or that have none), and
completes those. DSF 1.9 treats a practitioner as its (local) organization except for draft
Tasks and Task updates, which are the organization's, and the ``*_PRACTITIONER`` codings; its
Tasks name the organization as requester.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsf_bridge.dsf.authorization import (
    DSF_ADMIN,
    Party,
    authorization_denied,
    authorization_entry,
    has_role,
    identifier_values,
    parent_organization_role,
)
from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import (
    BPMN_MESSAGE_SYSTEM,
    ORGANIZATION_IDENTIFIER_SYSTEM,
    PRACTITIONER_IDENTIFIER_SYSTEM,
    READ_ACCESS_ORGANIZATION_EXTENSION,
    READ_ACCESS_PARENT_ORGANIZATION_ROLE_EXTENSION,
    READ_ACCESS_TAG_SYSTEM,
    TASK_IDENTIFIER_SYSTEM,
)
from dsf_bridge.sandbox.resources import RESOURCE_TYPES, MemoryResourceStore

__all__ = [
    "DSF_OPERATIONS",
    "INSTANTIATES_CANONICAL",
    "SECURITY_CONTEXT_TYPES",
    "TAGGED_RESOURCE_TYPES",
    "OrganizationIdentity",
    "PractitionerIdentity",
    "ReadAccess",
    "RoleConfig",
    "RoleConfigError",
    "RoleMapping",
    "TaskAuthorization",
    "questionnaire_response_denied",
]

# Types whose read access DSF governs by read-access tags (AbstractMetaTagAuthorizationRule).
TAGGED_RESOURCE_TYPES = RESOURCE_TYPES - {"QuestionnaireResponse", "Task"}
_READ_ACCESS_CODES = frozenset({"LOCAL", "ORGANIZATION", "ROLE", "ALL"})
# The types a Binary.securityContext may name: the rules DSF's AuthorizationConfig hands to
# BinaryAuthorizationRule ("Binary and Task not supported as securityContext rule"), 2.1 and 1.9.
SECURITY_CONTEXT_TYPES = RESOURCE_TYPES & frozenset(
    {
        "ActivityDefinition", "Bundle", "CodeSystem", "DocumentReference", "Endpoint", "Group",
        "HealthcareService", "Library", "Location", "Measure", "MeasureReport", "NamingSystem",
        "Organization", "OrganizationAffiliation", "Patient", "Practitioner", "PractitionerRole",
        "Provenance", "Questionnaire", "QuestionnaireResponse", "ResearchStudy",
        "StructureDefinition", "Subscription", "ValueSet",
    }
)  # fmt: skip

INSTANTIATES_CANONICAL = re.compile(
    r"(?P<process_url>https?://(?P<domain>(?:[a-zA-Z0-9][a-zA-Z0-9-]{0,61}[a-zA-Z0-9]\.)+"
    r"[a-zA-Z0-9]{1,63})/bpe/Process/(?P<name>[a-zA-Z0-9-]+))\|(?P<version>\d+\.\d+)$"
)

# 1.x forbids in-progress -> in-progress (TaskAuthorizationRule of v1.9.0); 2.x allows it.
_ALLOWED_UPDATES = {
    ("draft", "draft"),
    ("requested", "in-progress"),
    ("in-progress", "in-progress"),
    ("in-progress", "completed"),
    ("requested", "failed"),
    ("in-progress", "failed"),
}


@dataclass(frozen=True)
class OrganizationIdentity:
    """The organization a client certificate belongs to."""

    organization: dict[str, Any]
    identifier: str
    local: bool

    @property
    def active(self) -> bool:
        return self.organization.get("active", True) is not False

    @property
    def name(self) -> str:
        """For logs: the organization identifier (practitioners: ``<organization>/<e-mail>``)."""
        return self.identifier


# DSF's FhirServerRole operations (FhirServerRoleImpl.Operation).
DSF_OPERATIONS = frozenset(
    {"CREATE", "READ", "UPDATE", "DELETE", "SEARCH", "HISTORY", "PERMANENT_DELETE", "WEBSOCKET"}
)


@dataclass(frozen=True)
class PractitionerIdentity(OrganizationIdentity):
    """A practitioner of the local organization (DSF's ``PractitionerIdentityImpl`` for a client
    certificate of the role config): its identifier (e-mail), DSF roles and practitioner roles.

    ``dsf_roles`` maps an operation to the resource types it is allowed on (None: all types).
    """

    practitioner: str
    practitioner_roles: frozenset[tuple[str, str]]
    dsf_roles: Mapping[str, frozenset[str] | None]

    @property
    def name(self) -> str:
        return f"{self.identifier}/{self.practitioner}"

    @property
    def dsf_admin(self) -> bool:
        return DSF_ADMIN in self.practitioner_roles

    def allows(self, operation: str, resource_type: str | None) -> bool:
        """``hasDsfRole``: whether a DSF role allows ``operation`` on ``resource_type``."""
        if operation not in self.dsf_roles:
            return False
        types = self.dsf_roles[operation]
        return types is None or resource_type is None or resource_type in types


class RoleConfigError(ValueError):
    """A sandbox role configuration that DSF would not accept as meant."""


_THUMBPRINT = re.compile(r"^[a-f0-9]{128}$")
_ROLE_PROPERTIES = frozenset({"thumbprint", "email", "dsf-role", "practitioner-role"})


@dataclass(frozen=True)
class RoleMapping:
    """One rule of the role config: who (thumbprints, e-mails) gets which roles."""

    name: str
    thumbprints: frozenset[str] = frozenset()
    emails: frozenset[str] = frozenset()
    dsf_roles: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    practitioner_roles: frozenset[tuple[str, str]] = frozenset()


def _strings(value: object, rule: str, name: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise RoleConfigError(f"role config rule {rule!r}: {name} needs non-blank strings")
    return [str(v).strip() for v in values]


def _dsf_roles(value: object, rule: str) -> dict[str, frozenset[str] | None]:
    roles: dict[str, frozenset[str] | None] = {}
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, str):
            items: list[tuple[str, object]] = [(entry, None)]
        elif isinstance(entry, dict) and len(entry) == 1:
            items = list(entry.items())
        else:
            raise RoleConfigError(f"role config rule {rule!r}: dsf-role entry {entry!r} invalid")
        for operation, types in items:
            if operation not in DSF_OPERATIONS:
                raise RoleConfigError(
                    f"role config rule {rule!r}: unknown dsf-role {operation!r}, expected one "
                    f"of {sorted(DSF_OPERATIONS)}"
                )
            allowed = None if types is None else frozenset(_strings(types, rule, operation))
            unknown = (allowed or frozenset()) - RESOURCE_TYPES
            if unknown:
                raise RoleConfigError(
                    f"role config rule {rule!r}: {operation} names unknown resource types "
                    f"{sorted(unknown)}"
                )
            previous = roles.get(operation, frozenset())
            roles[operation] = (
                None if allowed is None or previous is None else frozenset(previous | allowed)
            )
    return roles


class RoleConfig:
    """The sandbox's ``dev.dsf.fhir.server.roleConfig``: client certificates of local users
    mapped to DSF roles and practitioner roles.

    :meth:`parse` takes DSF's YAML structure as Python data (JSON works too): a list of
    one-key mappings, rule name -> properties ``thumbprint`` (SHA-512, 128 lower-case hex
    characters), ``email``, ``dsf-role`` (operation names, or ``{OPERATION: [resource types]}``)
    and ``practitioner-role`` (``system|code``)::

        [{"practitioner-test-user": {
            "thumbprint": "<128 hex>",
            "dsf-role": ["CREATE", {"READ": ["Task", "QuestionnaireResponse"]}],
            "practitioner-role": ["http://dsf.dev/fhir/CodeSystem/practitioner-role|DIC_USER"],
        }}]

    DSF ignores (with a warning) what it cannot read; the sandbox raises
    :class:`RoleConfigError` instead, so a typo fails at start-up. OpenID Connect properties
    (``token-role``, ``token-group``) are not supported.
    """

    def __init__(self, mappings: Iterable[RoleMapping] = ()) -> None:
        self.mappings = tuple(mappings)

    @classmethod
    def parse(cls, config: Sequence[Mapping[str, Mapping[str, Any]]]) -> RoleConfig:
        mappings: list[RoleMapping] = []
        for rule in config:
            if not isinstance(rule, Mapping):
                raise RoleConfigError(f"role config rule {rule!r} is not a mapping")
            for name, properties in rule.items():
                if not isinstance(properties, Mapping):
                    raise RoleConfigError(f"role config rule {name!r} has no properties")
                unknown = set(properties) - _ROLE_PROPERTIES
                if unknown:
                    raise RoleConfigError(
                        f"role config rule {name!r}: unknown properties {sorted(unknown)}, "
                        f"expected {sorted(_ROLE_PROPERTIES)}"
                    )
                thumbprints = _strings(properties.get("thumbprint", []), name, "thumbprint")
                if not all(_THUMBPRINT.match(t) for t in thumbprints):
                    raise RoleConfigError(
                        f"role config rule {name!r}: thumbprint not 128 lower-case hex characters"
                    )
                roles: list[tuple[str, str]] = []
                for text in _strings(
                    properties.get("practitioner-role", []), name, "practitioner-role"
                ):
                    system, _, code = text.partition("|")
                    if not system or not code:
                        raise RoleConfigError(
                            f"role config rule {name!r}: practitioner-role {text!r} not system|code"
                        )
                    roles.append((system, code))
                mappings.append(
                    RoleMapping(
                        str(name),
                        frozenset(thumbprints),
                        frozenset(_strings(properties.get("email", []), name, "email")),
                        _dsf_roles(properties.get("dsf-role", []), name),
                        frozenset(roles),
                    )
                )
        return cls(mappings)

    def knows(self, thumbprint: str) -> bool:
        return any(thumbprint.lower() in m.thumbprints for m in self.mappings)

    def practitioner(
        self,
        local_organization: dict[str, Any],
        local_identifier: str,
        thumbprint: str,
        email: str | None,
    ) -> PractitionerIdentity | None:
        """The practitioner a configured certificate stands for (DSF's
        ``AbstractIdentityProvider``): identifier its e-mail, else
        ``<thumbprint>@certificate.invalid``; roles of the rules matching thumbprint or e-mail."""
        thumbprint = thumbprint.lower()
        if not self.knows(thumbprint):
            return None
        identifier = email or f"{thumbprint}@certificate.invalid"
        matching = [
            m for m in self.mappings if thumbprint in m.thumbprints or identifier in m.emails
        ]
        dsf_roles: dict[str, frozenset[str] | None] = {}
        for mapping in matching:
            for operation, types in mapping.dsf_roles.items():
                previous = dsf_roles.get(operation, frozenset())
                dsf_roles[operation] = (
                    None if types is None or previous is None else frozenset(previous | types)
                )
        return PractitionerIdentity(
            local_organization,
            local_identifier,
            True,
            identifier,
            frozenset(r for m in matching for r in m.practitioner_roles),
            dsf_roles,
        )


def _party(identity: OrganizationIdentity, release: DsfRelease = DSF_2) -> Party:
    if isinstance(identity, PractitionerIdentity):
        return Party(
            identity.identifier,
            local=identity.local,
            active=identity.active,
            practitioner=identity.practitioner,
            practitioner_roles=identity.practitioner_roles,
            dsf_admin=release.major >= 2 and identity.dsf_admin,
        )
    return Party(identity.identifier, local=identity.local, active=identity.active)


def _identifier_values(resource: dict[str, Any], system: str) -> list[str]:
    return [
        str(i["value"])
        for i in resource.get("identifier") or []
        if isinstance(i, dict) and i.get("system") == system and i.get("value")
    ]


def _message_names(task: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for parameter in task.get("input") or []:
        codings = (parameter.get("type") or {}).get("coding") or []
        if not any(
            c.get("system") == BPMN_MESSAGE_SYSTEM and c.get("code") == "message-name"
            for c in codings
        ):
            continue
        value = parameter.get("valueString")
        if isinstance(value, str) and value.strip():
            names.append(value)
    return names


def _is_business_key(parameter: dict[str, Any]) -> bool:
    codings = (parameter.get("type") or {}).get("coding") or []
    return any(
        c.get("system") == BPMN_MESSAGE_SYSTEM and c.get("code") == "business-key" for c in codings
    )


class TaskAuthorization:
    """Decides Task creates and updates against the resources in a sandbox store."""

    def __init__(
        self, store: MemoryResourceStore, local_identifier: str, release: DsfRelease = DSF_2
    ) -> None:
        self._store = store
        self._local = local_identifier
        self._release = release

    # -- create ---------------------------------------------------------------------------------

    @property
    def release(self) -> DsfRelease:
        return self._release

    def organization_or_admin(self, identity: OrganizationIdentity) -> bool:
        """``isLocalOrganizationOrDsfAdmin``: the local organization, or (2.x) a practitioner
        with the role ``DSF_ADMIN``."""
        if isinstance(identity, PractitionerIdentity):
            return self._release.major >= 2 and identity.dsf_admin
        return identity.local

    def create_denied(self, identity: OrganizationIdentity, task: dict[str, Any]) -> str | None:
        """Why ``identity`` may not create ``task``, or None when it may."""
        status = task.get("status")
        if status == "draft":
            if not self.organization_or_admin(identity):
                return (
                    "Task.status draft may only be created by the local organization or a "
                    "practitioner with role DSF_ADMIN"
                )
            errors = self._draft_errors(task)
            if errors:
                return ", ".join(errors)
            if self._draft_exists(task):
                return "a draft Task with this task-identifier already exists"
            return None
        if status != "requested":
            return f"Task.status {status or '(missing)'} not allowed on create (draft or requested)"
        errors = self._requested_errors(identity, task)
        if errors:
            return ", ".join(errors)
        return self._process_denied(task, requester=identity)

    def _requested_errors(self, identity: OrganizationIdentity, task: dict[str, Any]) -> list[str]:
        errors: list[str] = []
        if _identifier_values(task, TASK_IDENTIFIER_SYSTEM):
            errors.append(f"Task.identifier[{TASK_IDENTIFIER_SYSTEM}] defined")
        requester = task.get("requester")
        if isinstance(requester, dict) and requester:
            identifier = requester.get("identifier")
            if isinstance(identifier, dict) and identifier:
                if not identifier.get("system") or not identifier.get("value"):
                    errors.append(
                        "Task.requester.identifier.system or Task.requester.identifier.value "
                        "missing"
                    )
                elif isinstance(identity, PractitionerIdentity) and self._release.major >= 2:
                    if identifier.get("system") != PRACTITIONER_IDENTIFIER_SYSTEM:
                        errors.append(
                            f"Task.requester.identifier.system not {PRACTITIONER_IDENTIFIER_SYSTEM}"
                        )
                    if identifier.get("value") != identity.practitioner:
                        errors.append("Task.requester not current practitioner identity")
                elif identifier.get("system") != ORGANIZATION_IDENTIFIER_SYSTEM:
                    errors.append(
                        f"Task.requester.identifier.system not {ORGANIZATION_IDENTIFIER_SYSTEM}"
                    )
                elif identifier.get("value") != identity.identifier:
                    errors.append(
                        "Task.requester current identity not part of referenced organization"
                    )
            else:
                errors.append("Task.requester.identifier missing")
        else:
            errors.append("Task.requester missing")
        errors.extend(self._recipient_errors(task))
        errors.extend(self._common_errors(task))
        return errors

    def _draft_errors(self, task: dict[str, Any]) -> list[str]:
        errors: list[str] = []
        identifiers = _identifier_values(task, TASK_IDENTIFIER_SYSTEM)
        all_task_identifiers = [
            i
            for i in task.get("identifier") or []
            if isinstance(i, dict) and i.get("system") == TASK_IDENTIFIER_SYSTEM
        ]
        if len(all_task_identifiers) != 1:
            errors.append(
                f"Task.identifier[{TASK_IDENTIFIER_SYSTEM}] not defined or more than once"
            )
        elif not identifiers:
            errors.append(f"Task.identifier[{TASK_IDENTIFIER_SYSTEM}] value not defined")
        requester = task.get("requester")
        if isinstance(requester, dict) and requester:
            identifiers_of_requester = self._organization_identifiers(requester)
            if identifiers_of_requester is None:
                errors.append("Task.requester could not be resolved")
            elif self._local not in identifiers_of_requester:
                errors.append("Task.requester not local organization")
        else:
            errors.append("Task.requester missing")
        errors.extend(self._recipient_errors(task))
        errors.extend(self._common_errors(task))
        return errors

    def _recipient_errors(self, task: dict[str, Any]) -> list[str]:
        restriction = task.get("restriction")
        if not isinstance(restriction, dict) or not restriction.get("recipient"):
            if isinstance(restriction, dict) and restriction:
                return ["Task.restriction.recipient missing or more than one"]
            return ["Task.restriction not defined"]
        recipients = restriction["recipient"]
        if len(recipients) != 1:
            return ["Task.restriction.recipient missing or more than one"]
        identifiers = self._organization_identifiers(recipients[0])
        if identifiers is None:
            return ["Task.restriction.recipient could not be resolved"]
        if self._local not in identifiers:
            return ["Task.restriction.recipient not local organization"]
        return []

    def _common_errors(self, task: dict[str, Any]) -> list[str]:
        errors: list[str] = []
        canonical = task.get("instantiatesCanonical")
        if not canonical:
            errors.append("Task.instantiatesCanonical not defined")
        elif not INSTANTIATES_CANONICAL.match(str(canonical)):
            errors.append("Task.instantiatesCanonical not matching the DSF process URL pattern")
        if not task.get("input"):
            errors.append("Task.input empty")
        elif len(_message_names(task)) != 1:
            errors.append(
                f"Task.input with system {BPMN_MESSAGE_SYSTEM} and code message-name with non "
                "empty string value not defined or more than one"
            )
        if task.get("output"):
            errors.append("Task.output not empty")
        return errors

    def _draft_exists(self, task: dict[str, Any]) -> bool:
        values = _identifier_values(task, TASK_IDENTIFIER_SYSTEM)
        return any(
            value in _identifier_values(other, TASK_IDENTIFIER_SYSTEM)
            for other in self._store.all("Task")
            for value in values
        )

    def _organization_identifiers(self, reference: dict[str, Any]) -> set[str] | None:
        """The organization identifiers a Reference points to; None when unresolvable."""
        identifier = reference.get("identifier")
        if isinstance(identifier, dict) and identifier.get("value"):
            if identifier.get("system") != ORGANIZATION_IDENTIFIER_SYSTEM:
                return None
            value = str(identifier["value"])
            found = [
                o
                for o in self._store.all("Organization")
                if value in _identifier_values(o, ORGANIZATION_IDENTIFIER_SYSTEM)
            ]
            return {value} if found else None
        literal = reference.get("reference")
        if isinstance(literal, str) and literal.startswith("Organization/"):
            organization = self._store.resolve(literal)
            if organization is None:
                return None
            return set(_identifier_values(organization, ORGANIZATION_IDENTIFIER_SYSTEM))
        return None

    # -- process authorization ------------------------------------------------------------------

    def _process_denied(
        self, task: dict[str, Any], *, requester: OrganizationIdentity | None
    ) -> str | None:
        match = INSTANTIATES_CANONICAL.match(str(task.get("instantiatesCanonical", "")))
        if match is None:
            return "Task.instantiatesCanonical not matching the DSF process URL pattern"
        process_url, version = match.group("process_url"), match.group("version")
        definitions = [
            a
            for a in self._store.all("ActivityDefinition")
            if a.get("url") == process_url
            and a.get("version") == version
            and a.get("status") in ("draft", "active")
        ]
        if not definitions:
            return f"no ActivityDefinition with url {process_url} and version {version}"
        message_name = _message_names(task)[0]
        profiles = [str(p) for p in (task.get("meta") or {}).get("profile") or []]
        local = self._local_identity()
        if local is None:
            return "the local organization is not in the allow list"
        if authorization_entry(definitions[0], message_name, profiles) is None:
            return (
                f"ActivityDefinition {process_url}|{version} authorizes no message "
                f"{message_name!r} with Task profile {profiles}"
            )
        return authorization_denied(
            definitions[0],
            message_name=message_name,
            profiles=profiles,
            requester=None if requester is None else _party(requester, self._release),
            recipient=_party(local),
            affiliations=self._store.all("OrganizationAffiliation"),
            resolve=self._literal_references(),
        )

    def _literal_references(self) -> dict[str, str]:
        """``Organization/<id>`` -> organization identifier, for affiliations that use them."""
        return {
            f"Organization/{o['id']}": values[0]
            for o in self._store.all("Organization")
            if (values := identifier_values(o, ORGANIZATION_IDENTIFIER_SYSTEM))
        }

    def has_role(self, identity: OrganizationIdentity, parent: str, role: dict[str, Any]) -> bool:
        """Whether an active OrganizationAffiliation gives ``identity`` ``role`` under
        ``parent`` (read-access ROLE tags use this too)."""
        return has_role(
            _party(identity),
            parent,
            role,
            self._store.all("OrganizationAffiliation"),
            self._literal_references(),
        )

    def recipient_is_local(self, task: Mapping[str, Any]) -> bool:
        """``Task.restriction.recipient[0]`` resolves to the local organization."""
        recipients = (task.get("restriction") or {}).get("recipient") or []
        if not recipients or not isinstance(recipients[0], dict):
            return False
        identifiers = self._organization_identifiers(recipients[0])
        return identifiers is not None and self._local in identifiers

    def _local_identity(self) -> OrganizationIdentity | None:
        for organization in self._store.all("Organization"):
            if self._local in _identifier_values(organization, ORGANIZATION_IDENTIFIER_SYSTEM):
                return OrganizationIdentity(organization, self._local, local=True)
        return None

    # -- update ---------------------------------------------------------------------------------

    def update_denied(
        self, identity: OrganizationIdentity, old: dict[str, Any], new: dict[str, Any]
    ) -> str | None:
        """Why ``identity`` may not replace ``old`` by ``new``, or None when it may."""
        transition = (str(old.get("status")), str(new.get("status")))
        if transition not in _ALLOWED_UPDATES or (
            transition == ("in-progress", "in-progress")
            and not self._release.allows_in_progress_update
        ):
            return f"Task.status change {transition[0]} -> {transition[1]} not allowed"
        if not self.organization_or_admin(identity):
            return (
                "Task updates are allowed for the local organization or a practitioner with role "
                "DSF_ADMIN only"
            )
        if transition == ("draft", "draft"):
            errors = self._draft_errors(new)
            if errors:
                return ", ".join(errors)
            if _identifier_values(old, TASK_IDENTIFIER_SYSTEM) != _identifier_values(
                new, TASK_IDENTIFIER_SYSTEM
            ):
                return "Task.identifier[task-identifier] modified"
            return None
        changed = _changed(old, new)
        if changed:
            return f"modified: {', '.join(changed)}"
        if transition == ("requested", "in-progress"):
            if new.get("output"):
                return "Task.output not expected"
            return self._process_denied(new, requester=None)
        # taskAllowedForRecipient: the process (a draft or active ActivityDefinition) must still
        # admit the local organization as recipient; 1.x asks it for in-progress -> failed too.
        if transition in (("in-progress", "in-progress"), ("in-progress", "completed")) or (
            transition == ("in-progress", "failed") and self._release.major < 2
        ):
            return self._process_denied(new, requester=None)
        return None


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    errors = [
        f"Task.{name}"
        for name in ("requester", "restriction", "instantiatesCanonical")
        if old.get(name) != new.get(name)
    ]
    old_inputs = list(old.get("input") or [])
    new_inputs = list(new.get("input") or [])
    # The engine adds a business-key when it takes a Task (requested -> in-progress or failed).
    if (
        old.get("status") == "requested"
        and new.get("status") in ("in-progress", "failed")
        and not any(_is_business_key(i) for i in old_inputs)
    ):
        new_inputs = [i for i in new_inputs if not _is_business_key(i)]
    if old_inputs != new_inputs:
        errors.append("Task.input")
    return errors


class ReadAccess:
    """DSF's read-access tags: who may read a resource, and whether its tags are valid.

    Valid tags (``ReadAccessHelperImpl.isValid``): exactly one ``LOCAL`` with any number of
    ``ORGANIZATION`` (extension ``extension-read-access-organization``), ``ROLE`` (extension
    ``extension-read-access-parent-organization-role``) and ``ALL`` tags, or ``ALL`` alone;
    ``organization_exists`` says whether an ``ORGANIZATION`` tag's organization (and a ``ROLE``
    tag's parent organization) is on the server, as DSF demands. The
    local organization reads ``LOCAL`` and ``ALL``; a remote one ``ALL``, ``ORGANIZATION`` naming it
    and ``ROLE`` when an affiliation gives it that role. Tasks are not tagged: the local
    organization reads all, a remote one those it requested. QuestionnaireResponses are local.

    Binaries (``BinaryAuthorizationRule``): a valid read-access tag or a valid
    ``securityContext``, not both and not neither. A Binary is read by whoever may read its
    security context's tags (``on_binaries_insert.sql`` copies the ``read_access`` rows of the
    resource a literal ``securityContext.reference`` names; ``on_resources_insert.sql`` renews
    them when that resource gets a new version and ``on_resources_update.sql`` drops them when
    it is deleted), plus whoever its own tags admit. ``security_context`` resolves a Binary's
    literal security context to the resource whose tags count now (the current version, or the
    version a ``_history`` reference pins; None when there is none); ``valid_security_context``
    says whether the security context resolves (literal or logical) to a type DSF accepts.
    """

    def __init__(
        self,
        tasks: TaskAuthorization,
        security_context: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
        valid_security_context: Callable[[dict[str, Any]], bool] | None = None,
        organization_exists: Callable[[str], bool] | None = None,
    ) -> None:
        self._tasks = tasks
        self._security_context = security_context or (lambda _binary: None)
        self._valid_security_context = valid_security_context or (lambda _binary: False)
        # DSF's isValid(resource) without a server behind it takes every organization as
        # existing; the FHIR server passes organizationWithIdentifierExists. (Its roleExists,
        # a CodeSystem defining the role, is not checked: see docs/sandbox.md.)
        self._organization_exists = organization_exists or (lambda _identifier: True)

    @staticmethod
    def _tags(resource: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            tag
            for tag in (resource.get("meta") or {}).get("tag") or []
            if isinstance(tag, dict)
            and tag.get("system") == READ_ACCESS_TAG_SYSTEM
            and tag.get("code") in _READ_ACCESS_CODES
        ]

    def invalid(self, resource: dict[str, Any]) -> str | None:
        """Why the read-access tags of ``resource`` are invalid, or None."""
        if resource.get("resourceType") not in TAGGED_RESOURCE_TYPES:
            return None
        reason = self._tags_invalid(resource)
        if resource.get("resourceType") != "Binary":
            return reason
        security_context = bool(resource.get("securityContext")) and (
            self._valid_security_context(resource)
        )
        if reason is not None and not security_context:
            return "Binary is missing a valid read access tag or a valid securityContext"
        if reason is None and security_context:
            return "Binary cannot have a valid read access tag and a valid securityContext"
        return None

    def _tags_invalid(self, resource: dict[str, Any]) -> str | None:
        tags = self._tags(resource)
        codes = [str(tag["code"]) for tag in tags]
        local = codes.count("LOCAL") == 1
        everyone = codes.count("ALL") == 1
        if not ((local and len(tags) >= 1) ^ (everyone and len(tags) == 1)):
            return (
                f"read-access tags ({READ_ACCESS_TAG_SYSTEM}) missing or invalid: one LOCAL "
                "(with optional ORGANIZATION, ROLE and ALL tags) or ALL alone"
            )
        for tag in tags:
            if tag["code"] == "ORGANIZATION":
                organization = self._tag_organization(tag)
                if organization is None:
                    return "read-access tag ORGANIZATION without a valid organization extension"
                if not self._organization_exists(organization):
                    return (
                        f"read-access tag ORGANIZATION names organization {organization!r}, "
                        "which this FHIR server does not know"
                    )
            if tag["code"] == "ROLE":
                parent_role = self._tag_role(tag)
                if parent_role is None:
                    return "read-access tag ROLE without a valid parent-organization-role extension"
                parent = parent_role[0]
                if not self._organization_exists(parent):
                    return (
                        f"read-access tag ROLE names parent organization {parent!r}, which this "
                        "FHIR server does not know"
                    )
        return None

    def may_read(self, identity: OrganizationIdentity, resource: dict[str, Any]) -> bool:
        resource_type = resource.get("resourceType")
        if isinstance(identity, PractitionerIdentity) and self._tasks.release.major >= 2:
            if resource_type == "Task":
                return self._practitioner_reads_task(identity, resource)
            if resource_type == "QuestionnaireResponse":
                return identity.dsf_admin or practitioner_authorized(resource, identity)
        if resource_type == "Task":
            if identity.local:
                return True
            identifier = (resource.get("requester") or {}).get("identifier") or {}
            return bool(
                identifier.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM
                and identifier.get("value") == identity.identifier
            )
        if resource_type not in TAGGED_RESOURCE_TYPES:
            return identity.local
        if self._tags_admit(identity, resource):
            return True
        if resource_type == "Binary":
            context = self._security_context(resource)
            return context is not None and self._tags_admit(identity, context)
        return False

    def _tags_admit(self, identity: OrganizationIdentity, resource: dict[str, Any]) -> bool:
        """Whether the read-access tags of ``resource`` admit ``identity``."""
        codes = {str(tag["code"]) for tag in self._tags(resource)}
        if "ALL" in codes or (identity.local and "LOCAL" in codes):
            return True
        for tag in self._tags(resource):
            if tag["code"] == "ORGANIZATION" and self._tag_organization(tag) == identity.identifier:
                return True
            if tag["code"] == "ROLE":
                parent_role = self._tag_role(tag)
                if parent_role is not None and self._tasks.has_role(identity, *parent_role):
                    return True
        return False

    def _practitioner_reads_task(
        self, identity: PractitionerIdentity, task: dict[str, Any]
    ) -> bool:
        """``TaskAuthorizationRule.reasonReadAllowed`` for a practitioner (DSF 2.x): DSF_ADMIN
        reads the local organization's Tasks; others the Tasks they requested and drafts."""
        recipient_local = self._tasks.recipient_is_local(task)
        if identity.dsf_admin and recipient_local:
            return True
        identifier = (task.get("requester") or {}).get("identifier") or {}
        if (
            identifier.get("system") == PRACTITIONER_IDENTIFIER_SYSTEM
            and identifier.get("value") == identity.practitioner
        ):
            return True
        return task.get("status") == "draft" and recipient_local

    @staticmethod
    def _tag_organization(tag: dict[str, Any]) -> str | None:
        for extension in tag.get("extension") or []:
            identifier = extension.get("valueIdentifier") or {}
            if (
                extension.get("url") == READ_ACCESS_ORGANIZATION_EXTENSION
                and identifier.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM
                and identifier.get("value")
            ):
                return str(identifier["value"])
        return None

    @staticmethod
    def _tag_role(tag: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        for extension in tag.get("extension") or []:
            if extension.get("url") != READ_ACCESS_PARENT_ORGANIZATION_ROLE_EXTENSION:
                continue
            parent_role = parent_organization_role(extension)
            if parent_role is not None:
                return parent_role[0], dict(parent_role[1])
        return None


_QUESTIONNAIRE_RESPONSE_UPDATES = {
    ("in-progress", "completed"),
    ("in-progress", "stopped"),
    ("completed", "amended"),
}
# 1.x knows no amended QuestionnaireResponses.
_QUESTIONNAIRE_RESPONSE_UPDATES_1 = {("in-progress", "completed"), ("in-progress", "stopped")}


def _item_answer(response: dict[str, Any], link_id: str) -> tuple[str | None, str | None]:
    """The one non-blank string answer of item ``link_id``, or an error text."""
    items = [i for i in response.get("item") or [] if i.get("linkId") == link_id]
    if len(items) != 1:
        return None, f"QuestionnaireResponse.item[linkId={link_id}] missing or more than one"
    answers = items[0].get("answer") or []
    if len(answers) != 1:
        return None, f"QuestionnaireResponse.item[linkId={link_id}].answer missing or more than one"
    value = answers[0].get("valueString")
    if not isinstance(value, str) or not value.strip():
        return None, f"QuestionnaireResponse.item[linkId={link_id}].answer.value missing or blank"
    return value, None


def _status_only_change(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """``modificationsOkStatusOnly``: nothing but ``status`` (and the server's ``meta``)
    differs."""

    def rest(resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if k not in ("status", "meta")}

    return rest(old) == rest(new)


QUESTIONNAIRE_AUTHORIZATION_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-questionnaire-authorization"
)


def _questionnaire_authorizations(resource: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The ``practitioner`` and ``practitioner-role`` parts of the first
    ``extension-questionnaire-authorization``, or None when there is none."""
    for extension in resource.get("extension") or []:
        if extension.get("url") == QUESTIONNAIRE_AUTHORIZATION_EXTENSION:
            return [
                dict(e)
                for e in extension.get("extension") or []
                if e.get("url") in ("practitioner", "practitioner-role")
            ]
    return None


def practitioner_authorized(resource: Mapping[str, Any], identity: PractitionerIdentity) -> bool:
    """``isPractitionerAuthorized`` (DSF 2.x): no ``extension-questionnaire-authorization``
    admits every local practitioner (1.x behaviour); else one names the practitioner or one of
    its practitioner roles."""
    parts = _questionnaire_authorizations(resource)
    if parts is None:
        return True
    for part in parts:
        identifier = part.get("valueIdentifier") or {}
        coding = part.get("valueCoding") or {}
        if part["url"] == "practitioner" and identifier.get("system") and identifier.get("value"):
            if (
                identifier["system"] == PRACTITIONER_IDENTIFIER_SYSTEM
                and identifier["value"] == identity.practitioner
            ):
                return True
        elif (
            part["url"] == "practitioner-role"
            and coding.get("system")
            and coding.get("code")
            and (str(coding["system"]), str(coding["code"])) in identity.practitioner_roles
        ):
            return True
    return False


def questionnaire_response_denied(
    identity: OrganizationIdentity,
    old: dict[str, Any] | None,
    new: dict[str, Any],
    release: DsfRelease = DSF_2,
) -> str | None:
    """DSF's ``QuestionnaireResponseAuthorizationRule``.

    Created by the local organization ``in-progress`` with one non-blank ``user-task-id`` answer
    and a ``questionnaire``. Updated by it ``in-progress`` -> ``completed`` with the same checks
    (2.x: a completed response names its author, the current identity, and ``authored``) and
    ``user-task-id``, ``business-key`` and ``questionnaire`` unchanged. 2.x: ``in-progress`` ->
    ``stopped`` and ``completed`` -> ``amended`` change the status only. 1.x: ``in-progress`` ->
    ``completed`` or ``stopped``, both checked like completed; no amended.

    Practitioners (2.x): creates, stops and amendments need ``DSF_ADMIN``; a practitioner the
    ``extension-questionnaire-authorization`` admits completes (author: the practitioner); the
    extension may not change. 1.x lets every local practitioner act as its organization.
    """
    if not identity.local:
        return "QuestionnaireResponses are written by the local organization only"
    practitioner = identity if isinstance(identity, PractitionerIdentity) else None
    organization_or_admin = practitioner is None or release.major < 2 or (practitioner.dsf_admin)
    status = new.get("status")
    if old is None:
        if not organization_or_admin:
            return (
                "QuestionnaireResponses are created by the local organization or a practitioner "
                "with role DSF_ADMIN only"
            )
        return _questionnaire_response_errors(identity, new, {"in-progress"}, release)
    transition = (str(old.get("status")), str(status))
    allowed = (
        _QUESTIONNAIRE_RESPONSE_UPDATES if release.major >= 2 else _QUESTIONNAIRE_RESPONSE_UPDATES_1
    )
    if transition not in allowed:
        return f"QuestionnaireResponse.status change {transition[0]} -> {transition[1]} not allowed"
    if release.major >= 2 and transition != ("in-progress", "completed"):
        if not organization_or_admin:
            return "only the local organization or a practitioner with role DSF_ADMIN"
        return None if _status_only_change(old, new) else "modification not allowed"
    if (
        not organization_or_admin
        and practitioner is not None
        and not practitioner_authorized(old, practitioner)
    ):
        return "practitioner not authorized by extension-questionnaire-authorization"
    errors = _questionnaire_response_errors(identity, new, {"completed", "stopped"}, release)
    if errors:
        return errors
    if _item_answer(old, "user-task-id")[0] != _item_answer(new, "user-task-id")[0]:
        return "QuestionnaireResponse user-task-id modified"
    if _item_answer(old, "business-key")[0] != _item_answer(new, "business-key")[0]:
        return "QuestionnaireResponse business-key modified"
    if not old.get("questionnaire") or old.get("questionnaire") != new.get("questionnaire"):
        return "QuestionnaireResponse.questionnaire modified"
    if release.major >= 2 and _questionnaire_authorizations(old) != _questionnaire_authorizations(
        new
    ):
        return f"{QUESTIONNAIRE_AUTHORIZATION_EXTENSION} modified"
    return None


def _questionnaire_response_errors(
    identity: OrganizationIdentity, new: dict[str, Any], statuses: set[str], release: DsfRelease
) -> str | None:
    """``newResourceOk``."""
    errors: list[str] = []
    status = new.get("status")
    if status not in statuses:
        errors.append(f"QuestionnaireResponse.status not one of {sorted(statuses)}")
    _, error = _item_answer(new, "user-task-id")
    if error:
        errors.append(error)
    if not new.get("questionnaire"):
        errors.append("QuestionnaireResponse.questionnaire missing")
    if release.major >= 2 and status in ("completed", "amended"):
        identifier = (new.get("author") or {}).get("identifier") or {}
        if isinstance(identity, PractitionerIdentity):
            if (
                identifier.get("system") != PRACTITIONER_IDENTIFIER_SYSTEM
                or identifier.get("value") != identity.practitioner
            ):
                errors.append("QuestionnaireResponse.author not current practitioner identity")
        elif (
            identifier.get("system") != ORGANIZATION_IDENTIFIER_SYSTEM
            or identifier.get("value") != identity.identifier
        ):
            errors.append("QuestionnaireResponse.author not the current organization identity")
        if not new.get("authored"):
            errors.append("QuestionnaireResponse.authored missing")
    if release.major >= 2:
        for part in _questionnaire_authorizations(new) or []:
            value = part.get("valueIdentifier") if part["url"] == "practitioner" else None
            value = value or (part.get("valueCoding") if part["url"] != "practitioner" else None)
            keys = ("system", "value") if part["url"] == "practitioner" else ("system", "code")
            if not isinstance(value, dict) or not all(value.get(k) for k in keys):
                errors.append(f"{QUESTIONNAIRE_AUTHORIZATION_EXTENSION} invalid")
                break
    return ", ".join(errors) if errors else None
