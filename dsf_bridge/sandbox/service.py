"""The sandbox's FHIR REST semantics, independent of HTTP: identity by client-certificate
thumbprint, read, vread, search, create (conditional with ``If-None-Exist``), update (``If-Match``,
conditional), delete, and batch/transaction Bundles, with DSF's status codes and OperationOutcomes.

Behaviour taken from the DSF FHIR server: ``ETag: W/"<version>"``; ``If-Match`` with another
version answers 412; ``If-None-Exist`` with one match answers 200 with an OperationOutcome and the
match's ``Location`` and ``ETag``, with several 412; update of an unknown id (update as create)
answers 405; an unknown client certificate 401; a forbidden write 403 with an OperationOutcome;
a second resource with the same unique criteria (url and version, ...) 403. Writes other than
Tasks are reserved to the local organization, and tagged types need valid read-access tags;
reads follow those tags (remote organizations read Tasks only when they are the requester).
Practitioners of the local organization (:meth:`FhirService.configure_roles`) act within their
DSF roles (``hasDsfRole``: 403 for an operation their roles lack).
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import structlog

from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import (
    ORGANIZATION_IDENTIFIER_SYSTEM,
    THUMBPRINT_EXTENSION,
    operation_outcome,
)
from dsf_bridge.sandbox.authorization import (
    SECURITY_CONTEXT_TYPES,
    OrganizationIdentity,
    PractitionerIdentity,
    ReadAccess,
    RoleConfig,
    TaskAuthorization,
    questionnaire_response_denied,
)
from dsf_bridge.sandbox.binaries import BinaryContent, BinaryContentStore, InvalidBase64Error
from dsf_bridge.sandbox.parsing import UnparsableBodyError, as_parsed
from dsf_bridge.sandbox.resources import (
    INCLUDES,
    RESOURCE_TYPES,
    MemoryResourceStore,
    SearchError,
    SearchQuery,
    VersionConflictError,
    walk,
)

__all__ = ["FhirResponse", "FhirService", "unparsable"]

_log = structlog.get_logger()

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
}


@dataclass
class FhirResponse:
    """One answer: status, headers and the resource, if any; for a Binary read, created or
    updated, its content (the resource itself never carries ``data``: the HTTP layer streams
    the content raw or inlines it as base64)."""

    status: int
    resource: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content: BinaryContent | None = None


def _error(status: int, text: str, code: str = "processing") -> FhirResponse:
    return FhirResponse(status, operation_outcome(text, code=code))


def _as_stored(resource: dict[str, Any]) -> dict[str, Any]:
    """A stored resource as DSF would hold it: parsed by HAPI when it was written. (Tests put
    resources into the sandbox's store directly, values of any JSON kind included.)"""
    try:
        return as_parsed(resource)
    except UnparsableBodyError:
        return resource


def unparsable(reason: str) -> FhirResponse:
    """DSF's ``DataFormatExceptionHandler`` (2.1 and 1.9): a body HAPI cannot parse is
    answered 403 with "Unable to parse resource"; the parser's message goes to the log."""
    _log.warning("request.unparsable", reason=reason)
    return _error(403, "Unable to parse resource", code="structure")


def _forbidden(
    operation: str, identity: OrganizationIdentity, resource_type: str, reason: str
) -> FhirResponse:
    """DSF's ``ResponseGenerator.forbiddenNotAllowed``: the body says only ``Operation <op>
    forbidden``; why is for the server's log."""
    _log.warning(
        "request.forbidden",
        operation=operation,
        resource_type=resource_type,
        organization=identity.name,
        reason=reason,
    )
    return _error(403, f"Operation {operation} forbidden", code="forbidden")


def _etag(resource: Mapping[str, Any]) -> str:
    return f'W/"{resource["meta"]["versionId"]}"'


def _version_from_etag(value: str) -> int | None:
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    return int(text) if text.isdigit() else None


class FhirService:
    """A DSF-like FHIR server for one local organization, over a :class:`MemoryResourceStore`."""

    def __init__(
        self,
        store: MemoryResourceStore,
        local_organization: str,
        base_url: str,
        *,
        release: DsfRelease = DSF_2,
        binary_directory: Path | None = None,
    ) -> None:
        self.store = store
        self.local_organization = local_organization
        self.base_url = base_url.rstrip("/")
        self.release = release
        self.tasks = TaskAuthorization(store, local_organization, release)
        # Profile validation (sandbox.validation), set by build_service; None validates nothing.
        self.validator: Callable[[dict[str, Any]], list[str]] | None = None
        self.read_access = ReadAccess(
            self.tasks,
            self._security_context,
            self._valid_security_context,
            self._organization_exists,
        )
        # Binary content in files (binary_directory, else a temporary directory).
        self.binaries = BinaryContentStore(binary_directory)
        self.roles = RoleConfig()
        self._faults: list[tuple[str, str, int]] = []
        self._in_bundle = False

    def inject_failures(self, method: str, path_prefix: str, statuses: Sequence[int]) -> None:
        """Test hook: answer the next matching requests with these HTTP statuses, in order,
        before doing anything (as an overloaded or restarting server would)."""
        self._faults.extend((method.upper(), path_prefix.strip("/"), s) for s in statuses)

    def clear_failures(self) -> None:
        """Test hook: drop the injected failures not answered yet (the server is well again)."""
        self._faults.clear()

    def _injected_failure(self, method: str, path: str) -> FhirResponse | None:
        for index, (fault_method, prefix, status) in enumerate(self._faults):
            if fault_method == method and path.strip("/").startswith(prefix):
                del self._faults[index]
                return _error(status, f"injected failure {status} (sandbox test hook)")
        return None

    def set_base_url(self, base_url: str) -> None:
        """Serve under ``base_url`` and point the local organization's Endpoint at it (the port
        is known only once the socket is bound)."""
        self.base_url = base_url.rstrip("/")
        identity = self.local_identity()
        for organization in self.store.all("Organization"):
            identifiers = {i.get("value") for i in organization.get("identifier") or []}
            if self.local_organization not in identifiers:
                continue
            for reference in organization.get("endpoint") or []:
                endpoint = self.store.resolve(str(reference.get("reference", "")))
                if endpoint is not None and endpoint.get("address") != self.base_url:
                    endpoint["address"] = self.base_url
                    self.update(identity, "Endpoint", endpoint["id"], endpoint, {})

    def configure_roles(self, config: RoleConfig | Sequence[Mapping[str, Any]]) -> None:
        """Local users: client certificates mapped to a practitioner of the local organization
        with DSF roles and practitioner roles, as DSF's ``dev.dsf.fhir.server.roleConfig``
        (a :class:`RoleConfig`, or its DSF-shaped data for :meth:`RoleConfig.parse`)."""
        self.roles = config if isinstance(config, RoleConfig) else RoleConfig.parse(config)

    # -- identity -------------------------------------------------------------------------------

    def identify(
        self, certificate_thumbprint: str | None, certificate_email: str | None = None
    ) -> OrganizationIdentity | FhirResponse:
        """The organization whose allow-list thumbprint matches, else the local practitioner the
        role config maps the certificate to (``certificate_email``: the e-mail in the
        certificate's subject or subject alternative names), else a 401 answer."""
        if certificate_thumbprint is None:
            return _error(401, "no client certificate presented", code="login")
        for organization in self.store.all("Organization"):
            if organization.get("active") is False:
                continue
            thumbprints = {
                str(e.get("valueString", "")).lower()
                for e in organization.get("extension") or []
                if e.get("url") == THUMBPRINT_EXTENSION
            }
            if certificate_thumbprint.lower() in thumbprints:
                identifiers = [
                    str(i["value"])
                    for i in organization.get("identifier") or []
                    if i.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM and i.get("value")
                ]
                if not identifiers:
                    continue
                identifier = identifiers[0]
                return OrganizationIdentity(
                    organization, identifier, local=identifier == self.local_organization
                )
        local = self._local_organization_resource()
        if local is not None:
            practitioner = self.roles.practitioner(
                local, self.local_organization, certificate_thumbprint, certificate_email
            )
            if practitioner is not None:
                return practitioner
        _log.warning("identity.rejected", thumbprint=certificate_thumbprint[:16])
        return _error(
            401,
            f"client certificate with thumbprint {certificate_thumbprint} belongs to no "
            "organization of the allow list",
            code="login",
        )

    def _local_organization_resource(self) -> dict[str, Any] | None:
        for organization in self.store.all("Organization"):
            if organization.get("active") is False:
                continue
            if any(
                i.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM
                and i.get("value") == self.local_organization
                for i in organization.get("identifier") or []
            ):
                return organization
        return None

    def local_identity(self) -> OrganizationIdentity:
        """The local organization as caller: used to load the allow list at start-up."""
        organization: dict[str, Any] = {
            "resourceType": "Organization",
            "identifier": [
                {"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": self.local_organization}
            ],
            "active": True,
        }
        return OrganizationIdentity(organization, self.local_organization, local=True)

    def may_read(self, identity: OrganizationIdentity, resource: Mapping[str, Any]) -> bool:
        return self.read_access.may_read(identity, dict(resource))

    # -- dispatch -------------------------------------------------------------------------------

    def handle(
        self,
        identity: OrganizationIdentity,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        headers: Mapping[str, str],
        body: dict[str, Any] | None,
        content: BinaryContent | None = None,
    ) -> FhirResponse:
        """One REST interaction; ``path`` is relative to the base (``Task/123``), ``headers``
        have lower-case names. ``content``: the staged body of a raw Binary upload (``body`` is
        then the Binary resource without ``data``); it is stored or discarded here."""
        try:
            return self._handle(
                identity, method, path, params, headers=headers, body=body, content=content
            )
        finally:
            # Stored content was moved to its version's file; what is left was refused.
            self.binaries.discard(content)

    def upload_denied(
        self, identity: OrganizationIdentity, body: dict[str, Any]
    ) -> FhirResponse | None:
        """A raw Binary create judged before its content is read: DSF authorizes the resource
        (content type, security context) before the DAO streams the data into its database,
        so a refused upload costs the server no disk. None: go on and read the body."""
        if any(method == "POST" for method, _, _ in self._faults):
            return None  # the test hook answers first, as in handle()
        lacking = _role_lacking(identity, "POST", ["Binary"])
        if lacking is not None:
            return _forbidden("create", identity, "Binary", "no DSF role")
        return self._write_denied(identity, "create", body, None)

    def _handle(
        self,
        identity: OrganizationIdentity,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]],
        *,
        headers: Mapping[str, str],
        body: dict[str, Any] | None,
        content: BinaryContent | None,
    ) -> FhirResponse:
        injected = self._injected_failure(method, path)
        if injected is not None:
            return injected
        parts = [p for p in path.strip("/").split("/") if p]
        lacking = _role_lacking(identity, method, parts)
        if lacking is not None:
            return _forbidden(lacking[0].lower(), identity, lacking[1] or "(base)", "no DSF role")
        if body is not None and method in ("POST", "PUT"):
            # DSF parses the body before any rule reads it (HAPI, lenient): see parsing.py.
            try:
                body = as_parsed(body)
            except UnparsableBodyError as exc:
                return unparsable(str(exc))
        try:
            if not parts and method == "POST":
                return self._bundle(identity, body, headers)
            if parts == ["_history"] and method == "GET":
                return self.history(identity, None, None)
            if not parts:
                return _error(405, f"{method} on the base URL is not supported")
            resource_type = parts[0]
            if resource_type not in RESOURCE_TYPES:
                return _error(
                    404, f"resource type {resource_type} not supported", code="not-supported"
                )
            if len(parts) == 1:
                if method == "GET":
                    return self.search(identity, resource_type, params, headers)
                if method == "POST":
                    return self.create(identity, resource_type, body, headers, content=content)
                if method == "PUT":
                    return self._conditional_update(identity, resource_type, params, body, headers)
            elif len(parts) == 2 and parts[1] != "_history":
                if method == "GET":
                    return self.read(identity, resource_type, parts[1], headers)
                if method == "PUT":
                    return self.update(
                        identity, resource_type, parts[1], body, headers, content=content
                    )
                if method == "DELETE":
                    return self.delete(identity, resource_type, parts[1])
            elif len(parts) == 2 and parts[1] == "_history" and method == "GET":
                return self.history(identity, resource_type, None)
            elif len(parts) == 3 and parts[2] == "_history" and method == "GET":
                return self.history(identity, resource_type, parts[1])
            elif len(parts) == 3 and parts[2] == "$permanent-delete" and method == "POST":
                return self.delete_permanently(identity, resource_type, parts[1])
            elif len(parts) == 4 and parts[2] == "_history" and method == "GET":
                return self.vread(identity, resource_type, parts[1], parts[3])
            return _error(405, f"{method} /{'/'.join(parts)} is not supported")
        except SearchError as exc:
            return _error(400, str(exc), code="invalid")
        except RecursionError:
            # The validator (pydantic) recurses where DSF's Java validator does not run out of
            # stack; refusing is stricter than DSF, never more lenient (docs/sandbox.md).
            _log.warning("request.too_deep", method=method, path=path)
            return _error(403, "the sandbox cannot judge a resource nested this deeply")

    # -- interactions ---------------------------------------------------------------------------

    def read(
        self,
        identity: OrganizationIdentity,
        resource_type: str,
        resource_id: str,
        headers: Mapping[str, str],
    ) -> FhirResponse:
        resource = self.store.read(resource_type, resource_id)
        if resource is None:
            if self.store.is_deleted(resource_type, resource_id):
                return _error(410, f"{resource_type}/{resource_id} deleted", code="deleted")
            return _error(404, f"{resource_type} with id {resource_id} not found", code="not-found")
        if not self.may_read(identity, resource):
            # DSF answers 403 for an existing resource the caller may not read.
            return _forbidden("read", identity, resource_type, f"{resource_type}/{resource_id}")
        if_match = headers.get("if-match")
        if if_match is not None:
            expected = _version_from_etag(if_match)
            if expected is not None and str(expected) != resource["meta"]["versionId"]:
                return FhirResponse(412)
        if_none_match = headers.get("if-none-match")
        if if_none_match is not None:
            # DSF's read: the caller's copy is current, 304 without a body (after the read
            # check: a caller that may not read gets 403 whatever its ETag says).
            known = _version_from_etag(if_none_match)
            if known is not None and str(known) == resource["meta"]["versionId"]:
                return self._with_headers(FhirResponse(304), resource)
        return self._with_headers(self._found(resource), resource)

    def vread(
        self, identity: OrganizationIdentity, resource_type: str, resource_id: str, version: str
    ) -> FhirResponse:
        resource = (
            self.store.read_version(resource_type, resource_id, int(version))
            if version.isdigit()
            else None
        )
        if resource is None:
            return _error(
                404, f"{resource_type}/{resource_id}/_history/{version} not found", code="not-found"
            )
        if not self.may_read(identity, resource):
            return _forbidden("read", identity, resource_type, f"{resource_type}/{resource_id}")
        return self._with_headers(self._found(resource), resource)

    def search(
        self,
        identity: OrganizationIdentity,
        resource_type: str,
        params: Sequence[tuple[str, str]],
        headers: Mapping[str, str],
    ) -> FhirResponse:
        query = SearchQuery.parse(resource_type, params)
        if query.unsupported and "handling=strict" in headers.get("prefer", ""):
            return _error(
                400,
                f"unsupported search parameters: {', '.join(query.unsupported)}",
                code="invalid",
            )
        # The stored versions (not copies): only the page's are copied into the Bundle.
        matches = [r for r in self.store.stored_matches(query) if self.may_read(identity, r)]
        total = len(matches)
        link_params = [(k, v) for k, v in params if k != "_page"]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": total,
            "link": [],
            "entry": [],
        }
        if query.summary_count or query.count == 0:
            return FhirResponse(200, bundle)
        pages = max(1, -(-total // query.count))
        start = (query.page - 1) * query.count
        page = [copy.deepcopy(r) for r in matches[start : start + query.count]]

        def link(relation: str, number: int) -> dict[str, str]:
            url = f"{self.base_url}/{resource_type}?" + urlencode(
                [*link_params, ("_page", str(number))]
            )
            return {"relation": relation, "url": url}

        bundle["link"].append(link("self", query.page))
        bundle["link"].append(link("first", 1))
        if query.page > 1:
            bundle["link"].append(link("previous", query.page - 1))
        if query.page < pages:
            bundle["link"].append(link("next", query.page + 1))
        bundle["link"].append(link("last", pages))
        included: dict[str, dict[str, Any]] = {}
        for resource in page:
            bundle["entry"].append(
                {
                    "fullUrl": f"{self.base_url}/{resource_type}/{resource['id']}",
                    "resource": resource,
                    "search": {"mode": "match"},
                }
            )
            for include in query.includes:
                included.update(self._included(resource, include))
        for key, resource in included.items():
            bundle["entry"].append(
                {
                    "fullUrl": f"{self.base_url}/{key}",
                    "resource": resource,
                    "search": {"mode": "include"},
                }
            )
        if query.unsupported:
            bundle["entry"].append(
                {
                    "resource": operation_outcome(
                        f"unsupported search parameters ignored: {', '.join(query.unsupported)}",
                        severity="warning",
                        code="not-supported",
                    ),
                    "search": {"mode": "outcome"},
                }
            )
        return FhirResponse(200, bundle)

    def _included(self, resource: dict[str, Any], include: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for reference in walk(resource, INCLUDES[include]):
            target = reference.get("reference") if isinstance(reference, dict) else None
            if isinstance(target, str):
                resolved = self.store.resolve(target)
                if resolved is not None:
                    found[f"{resolved['resourceType']}/{resolved['id']}"] = resolved
        return found

    def create(
        self,
        identity: OrganizationIdentity,
        resource_type: str,
        body: dict[str, Any] | None,
        headers: Mapping[str, str],
        *,
        resource_id: str | None = None,
        content: BinaryContent | None = None,
    ) -> FhirResponse:
        invalid = self._invalid_body(resource_type, body)
        if invalid is not None:
            return invalid
        if body is None:  # narrowed by _invalid_body; kept for the type checker
            return _error(400, "request body missing", code="invalid")
        if resource_type == "Binary" and content is None and body.get("data") is not None:
            staged = self._stage_data(body)
            if isinstance(staged, FhirResponse):
                return staged
            try:
                return self.create(
                    identity, resource_type, body, headers, resource_id=resource_id, content=staged
                )
            finally:
                self.binaries.discard(staged)
        # As DSF's AbstractResourceServiceSecure.create: authorization rules first, then profile
        # validation, then If-None-Exist. Inside a Bundle (DSF's CreateCommand) If-None-Exist
        # comes first: preExecute finds the existing resource before execute validates and
        # authorizes.
        if not self._in_bundle:
            denied = self._write_denied(identity, "create", body, None) or self._profile_invalid(
                "create", body
            )
            if denied is not None:
                return denied
        if_none_exist = headers.get("if-none-exist")
        if if_none_exist is not None:
            criteria = if_none_exist.split("?", 1)[-1]
            if not criteria.strip():
                return _error(400, "If-None-Exist header value blank", code="invalid")
            query = SearchQuery.parse(resource_type, parse_qsl(criteria, keep_blank_values=True))
            if query.unsupported:
                return _error(
                    400,
                    f"If-None-Exist criteria unsupported: {', '.join(query.unsupported)}",
                    code="invalid",
                )
            existing = self.store.search(query)
            if len(existing) == 1:
                # As DSF: 200 with an informational OperationOutcome, the existing resource's
                # Location, ETag and Last-Modified; not the resource itself.
                outcome = operation_outcome(
                    f"Resource with criteria '{if_none_exist}' exists",
                    severity="information",
                    code="duplicate",
                )
                return self._with_headers(FhirResponse(200, outcome), existing[0], location=True)
            if len(existing) > 1:
                return _error(
                    412,
                    f"Multiple {resource_type} resources with criteria '{if_none_exist}' exist",
                    code="multiple-matches",
                )
        if self._in_bundle:
            # CreateCommand.execute validates before it authorizes (both answer 403).
            denied = self._profile_invalid("create", body) or self._write_denied(
                identity, "create", body, None
            )
            if denied is not None:
                return denied
        resource = copy.deepcopy(body)
        resource.pop("id", None)
        resource.pop("data", None)
        created = self.store.create(resource, resource_id=resource_id)
        _log.info("resource.created", resource_type=resource_type, resource_id=created["id"])
        response = FhirResponse(201, created)
        if resource_type == "Binary":
            response.content = self._store_content(created, content)
        return self._with_headers(response, created, location=True)

    def update(
        self,
        identity: OrganizationIdentity,
        resource_type: str,
        resource_id: str,
        body: dict[str, Any] | None,
        headers: Mapping[str, str],
        *,
        content: BinaryContent | None = None,
    ) -> FhirResponse:
        invalid = self._invalid_body(resource_type, body)
        if invalid is not None:
            return invalid
        if body is None:
            return _error(400, "request body missing", code="invalid")
        if resource_type == "Binary" and content is None and body.get("data") is not None:
            staged = self._stage_data(body)
            if isinstance(staged, FhirResponse):
                return staged
            try:
                return self.update(
                    identity, resource_type, resource_id, body, headers, content=staged
                )
            finally:
                self.binaries.discard(staged)
        if body.get("id") != resource_id:
            return _error(400, "resource id in body does not match the URL", code="invalid")
        old = self.store.read(resource_type, resource_id)
        if old is None:
            return _error(405, "Update as create not allowed", code="forbidden")
        expected: int | None = None
        if "if-match" in headers:
            expected = _version_from_etag(headers["if-match"])
            if expected is None:
                return _error(400, f"If-Match {headers['if-match']!r} is no ETag", code="invalid")
        denied = (
            self._write_denied(identity, "update", body, old)
            or (None if _task_failed(body) else self._profile_invalid("update", body))
            or self._unresolved_reference(identity, body)
        )
        if denied is not None:
            return denied
        stored = {k: v for k, v in body.items() if k != "data"}
        try:
            updated = self.store.update(stored, expected_version=expected)
        except VersionConflictError as exc:
            return _error(412, f"Resource with id {resource_id} {exc}", code="conflict")
        _log.info(
            "resource.updated",
            resource_type=resource_type,
            resource_id=resource_id,
            version=updated["meta"]["versionId"],
        )
        response = FhirResponse(200, updated)
        if resource_type == "Binary":
            response.content = self._store_content(updated, content)
        return self._with_headers(response, updated, location=True)

    def _conditional_update(
        self,
        identity: OrganizationIdentity,
        resource_type: str,
        params: Sequence[tuple[str, str]],
        body: dict[str, Any] | None,
        headers: Mapping[str, str],
        *,
        resource_id: str | None = None,
    ) -> FhirResponse:
        query = SearchQuery.parse(resource_type, params)
        if not query.criteria or query.unsupported:
            return _error(400, "conditional update needs supported search criteria", code="invalid")
        matches = self.store.search(query)
        if len(matches) > 1:
            return _error(
                412,
                f"Multiple {resource_type} resources match the criteria",
                code="multiple-matches",
            )
        if body is None:
            return _error(400, "request body missing", code="invalid")
        if not matches:
            return self.create(identity, resource_type, body, {}, resource_id=resource_id)
        resource = dict(body)
        resource["id"] = matches[0]["id"]
        return self.update(identity, resource_type, matches[0]["id"], resource, headers)

    def history(
        self, identity: OrganizationIdentity, resource_type: str | None, resource_id: str | None
    ) -> FhirResponse:
        """``_history`` of a resource, a type or the server: a Bundle of type ``history`` with
        the versions the caller may read (DSF filters the others out, it does not answer 403)."""
        versions = [
            v for v in self.store.history(resource_type, resource_id) if self.may_read(identity, v)
        ]
        entries = [
            {
                "fullUrl": f"{self.base_url}/{v['resourceType']}/{v['id']}",
                "resource": v,
                "request": {
                    "method": "POST" if v["meta"]["versionId"] == "1" else "PUT",
                    "url": f"{v['resourceType']}/{v['id']}/_history/{v['meta']['versionId']}",
                },
                "response": {"status": "200 OK"},
            }
            for v in versions
        ]
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "history",
            "total": len(entries),
            "entry": entries,
        }
        return FhirResponse(200, bundle)

    def delete_permanently(
        self, identity: OrganizationIdentity, resource_type: str, resource_id: str
    ) -> FhirResponse:
        """DSF's ``$permanent-delete``: local organization only (403 ``Operation delete
        forbidden``), and only for a resource already deleted (else 400)."""
        latest = self.store.read_version(resource_type, resource_id, 1)
        if latest is None:
            return _error(404, f"{resource_type} with id {resource_id} not found", code="not-found")
        if not identity.local:
            return _forbidden("delete", identity, resource_type, "local organization only")
        if not self.store.is_deleted(resource_type, resource_id):
            return _error(
                400,
                f"{resource_type} with id {resource_id} is not marked deleted",
                code="processing",
            )
        self.store.purge(resource_type, resource_id)
        if resource_type == "Binary":
            self.binaries.purge(resource_id)
        return FhirResponse(
            200,
            operation_outcome("permanently deleted", severity="information", code="informational"),
        )

    def delete(
        self, identity: OrganizationIdentity, resource_type: str, resource_id: str
    ) -> FhirResponse:
        old = self.store.read(resource_type, resource_id)
        if old is None:
            return _error(404, f"{resource_type} with id {resource_id} not found", code="not-found")
        if (
            not identity.local
            or (resource_type == "Task" and old.get("status") != "draft")
            or (
                resource_type in ("Task", "QuestionnaireResponse")
                and not self.tasks.organization_or_admin(identity)
            )
        ):
            return _forbidden(
                "delete", identity, resource_type, "local organization, Task.status draft only"
            )
        self.store.delete(resource_type, resource_id)
        return FhirResponse(
            200, operation_outcome("deleted", severity="information", code="informational")
        )

    # -- helpers --------------------------------------------------------------------------------

    def _found(self, resource: dict[str, Any]) -> FhirResponse:
        response = FhirResponse(200, resource)
        if resource.get("resourceType") == "Binary":
            response.content = self.binaries.get(resource["id"], resource["meta"]["versionId"])
        return response

    def _stage_data(self, body: dict[str, Any]) -> BinaryContent | FhirResponse:
        """A Binary resource's ``data`` into a file; not base64: HAPI's parser refuses it."""
        data = body.get("data")
        if not isinstance(data, str):
            return unparsable("Binary.data is no string")
        try:
            return self.binaries.stage_base64(data)
        except InvalidBase64Error as exc:
            return unparsable(str(exc))

    def _store_content(
        self, stored: dict[str, Any], content: BinaryContent | None
    ) -> BinaryContent | None:
        version = str(stored["meta"]["versionId"])
        self.binaries.commit(content, stored["id"], version)
        return self.binaries.get(stored["id"], version)

    def _security_context(self, binary: dict[str, Any]) -> dict[str, Any] | None:
        """The resource whose read-access tags a Binary inherits now, as DSF's triggers keep
        ``read_access``: a literal ``securityContext.reference`` (any base URL, the id is what
        counts), the current version or a pinned ``_history`` version, none once deleted.
        Logical references have no ``reference`` and give no read access."""
        reference = (binary.get("securityContext") or {}).get("reference")
        match = _SECURITY_CONTEXT.search(reference) if isinstance(reference, str) else None
        if match is None:
            return None
        resource_type, resource_id, version = match["type"], match["id"], match["version"]
        if self.store.is_deleted(resource_type, resource_id):
            return None
        if version is not None:
            return self.store.read_version(resource_type, resource_id, int(version))
        return self.store.read(resource_type, resource_id)

    def _organization_exists(self, identifier: str) -> bool:
        """``AbstractAuthorizationRule.organizationWithIdentifierExists``: an Organization (active
        or not) with this organization identifier is on the server."""
        wanted = (ORGANIZATION_IDENTIFIER_SYSTEM, identifier)
        return any(wanted in _identifiers(o) for o in self.store.all("Organization"))

    def _valid_security_context(self, binary: dict[str, Any]) -> bool:
        """``BinaryAuthorizationRule.hasValidSecurityContext``: a literal internal or logical
        reference that resolves, to a type with a security-context rule (not Binary, not
        Task)."""
        context = binary.get("securityContext")
        if not isinstance(context, dict):
            return False
        reference = context.get("reference")
        if isinstance(reference, str) and reference:
            if reference.startswith(self.base_url + "/"):
                reference = reference[len(self.base_url) + 1 :]
            if "://" in reference:
                return False  # external: DSF does not resolve it for a security context
            parts = reference.split("/")
            if len(parts) == 4 and parts[2] == "_history" and parts[3].isdigit():
                resolved = self.store.read_version(parts[0], parts[1], int(parts[3]))
            elif len(parts) == 2:
                resolved = self.store.read(parts[0], parts[1])
            else:
                return False
            return resolved is not None and parts[0] in SECURITY_CONTEXT_TYPES
        identifier = context.get("identifier")
        resource_type = context.get("type")
        if not isinstance(identifier, dict) or resource_type not in SECURITY_CONTEXT_TYPES:
            return False
        found = [
            r
            for r in self.store.all(str(resource_type))
            if (str(identifier.get("system")), str(identifier.get("value"))) in _identifiers(r)
        ]
        return len(found) == 1

    def _invalid_body(self, resource_type: str, body: dict[str, Any] | None) -> FhirResponse | None:
        if not isinstance(body, dict):
            return _error(400, "request body is no FHIR resource", code="invalid")
        if body.get("resourceType") != resource_type:
            return _error(
                400,
                f"resourceType {body.get('resourceType')!r} does not match the URL "
                f"({resource_type})",
                code="invalid",
            )
        return None

    def _profile_invalid(self, action: str, resource: dict[str, Any]) -> FhirResponse | None:
        """DSF validates a resource against its profiles before the authorization rules
        (``CreateCommand.execute``, ``UpdateCommand``) and answers 403 when it is invalid."""
        if self.validator is None:
            return None
        errors = self.validator(resource)
        if not errors:
            return None
        _log.warning(
            "request.invalid",
            action=action,
            resource_type=resource.get("resourceType"),
            errors="; ".join(errors),
        )
        return _error(403, "; ".join(errors), code="processing")

    def _write_denied(
        self,
        identity: OrganizationIdentity,
        action: str,
        resource: dict[str, Any],
        old: dict[str, Any] | None,
    ) -> FhirResponse | None:
        resource_type = resource["resourceType"]
        old = None if old is None else _as_stored(old)
        if resource_type == "Task":
            reason = (
                self.tasks.create_denied(identity, resource)
                if old is None
                else self.tasks.update_denied(identity, old, resource)
            )
        elif resource_type == "QuestionnaireResponse":
            reason = questionnaire_response_denied(identity, old, resource, self.release)
        elif not identity.local:
            reason = f"{action} of {resource_type} allowed for the local organization only"
        else:
            reason = self.read_access.invalid(resource)
            if reason is None and old is None:
                reason = self._duplicate(resource)
        if reason is None:
            return None
        return _forbidden(action, identity, resource_type, reason)

    def _unresolved_reference(
        self, identity: OrganizationIdentity, resource: dict[str, Any]
    ) -> FhirResponse | None:
        """DSF checks a Task's literal references after an update (``ReferencesHelperImpl``,
        ``ValidationRules.checkReferenceAfterUpdate``): a local one must resolve, else 403; none
        is checked when the Task becomes ``failed``. External literal references are not
        fetched by the sandbox (DSF asks the remote server)."""
        if resource.get("resourceType") != "Task" or _task_failed(resource):
            return None
        for reference in walk_references(resource):
            target = reference
            if target.startswith(self.base_url + "/"):
                target = target[len(self.base_url) + 1 :]
            if "://" in target or target.startswith(("urn:", "#")):
                continue
            if self.store.resolve(target) is None:
                return _forbidden("update", identity, "Task", f"reference {reference} not found")
        return None

    def _duplicate(self, resource: dict[str, Any]) -> str | None:
        """DSF refuses a second resource with the same unique criteria (``resourceExists`` of its
        authorization rules): url and version, a Subscription's criteria, type and payload, an
        Endpoint's or Organization's identifier, an Endpoint's address."""
        resource_type = str(resource["resourceType"])
        existing = self.store.all(resource_type)
        if resource_type in _URL_VERSION_UNIQUE:
            url, version = resource.get("url"), resource.get("version")
            if any((r.get("url"), r.get("version")) == (url, version) for r in existing):
                return f"{resource_type} with url {url} and version {version} exists"
        elif resource_type == "Subscription":
            channel = resource.get("channel") or {}
            wanted = (resource.get("criteria"), channel.get("type"), channel.get("payload"))
            for other in existing:
                other_channel = other.get("channel") or {}
                other_key = (
                    other.get("criteria"),
                    other_channel.get("type"),
                    other_channel.get("payload"),
                )
                if other_key == wanted:
                    return "Subscription with the same criteria, type and payload exists"
        elif resource_type in ("Endpoint", "Organization"):
            identifiers = _identifiers(resource)
            for other in existing:
                if identifiers & _identifiers(other):
                    return f"{resource_type} with the same identifier exists"
                if resource_type == "Endpoint" and other.get("address") == resource.get("address"):
                    return f"Endpoint with address {resource.get('address')} exists"
        return None

    def _with_headers(
        self, response: FhirResponse, resource: dict[str, Any], *, location: bool = False
    ) -> FhirResponse:
        response.headers["ETag"] = _etag(resource)
        response.headers["Last-Modified"] = resource["meta"]["lastUpdated"]
        if location:
            response.headers["Location"] = (
                f"{self.base_url}/{resource['resourceType']}/{resource['id']}"
                f"/_history/{resource['meta']['versionId']}"
            )
        return response

    # -- bundles --------------------------------------------------------------------------------

    def _bundle(
        self,
        identity: OrganizationIdentity,
        body: dict[str, Any] | None,
        headers: Mapping[str, str],
    ) -> FhirResponse:
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            return _error(400, "POST to the base URL needs a Bundle", code="invalid")
        kind = body.get("type")
        if kind not in ("batch", "transaction"):
            return _error(400, f"Bundle.type {kind!r} not batch or transaction", code="invalid")
        entries = [copy.deepcopy(e) for e in body.get("entry") or []]
        snapshot = self.store.snapshot() if kind == "transaction" else None
        # DSF resolves urn:uuid references in batches too (one id table per Bundle).
        self._resolve_placeholders(entries)
        prefer = headers.get("prefer", "")
        responses: list[dict[str, Any]] = []
        for index, entry in enumerate(entries):
            self._in_bundle = True
            try:
                result = _create_entry_invalid(index, entry) or self._bundle_entry(identity, entry)
            finally:
                self._in_bundle = False
            if kind == "transaction" and result.status >= 400:
                if snapshot is not None:
                    self.store.restore(snapshot)
                outcome = result.resource or operation_outcome("failed")
                text = outcome["issue"][0].get("diagnostics", "") if outcome.get("issue") else ""
                return FhirResponse(
                    result.status,
                    operation_outcome(f"transaction entry {index} failed: {text}"),
                )
            responses.append(self._response_entry(result, prefer))
        return FhirResponse(
            200,
            {
                "resourceType": "Bundle",
                "id": str(uuid.uuid4()),
                "type": f"{kind}-response",
                "entry": responses,
            },
        )

    def _bundle_entry(self, identity: OrganizationIdentity, entry: dict[str, Any]) -> FhirResponse:
        try:
            return self._bundle_entry_unchecked(identity, entry)
        except SearchError as exc:
            return _error(400, str(exc), code="invalid")

    def _bundle_entry_unchecked(
        self, identity: OrganizationIdentity, entry: dict[str, Any]
    ) -> FhirResponse:
        request = entry.get("request") or {}
        method = str(request.get("method", "")).upper()
        url = str(request.get("url", ""))
        path, _, query_string = url.partition("?")
        params = parse_qsl(query_string, keep_blank_values=True)
        headers: dict[str, str] = {}
        if request.get("ifNoneExist"):
            headers["if-none-exist"] = str(request["ifNoneExist"])
        if request.get("ifMatch"):
            headers["if-match"] = str(request["ifMatch"])
        resource = entry.get("resource")
        preassigned = entry.get("_assigned_id")
        if method == "POST" and "/" not in path.strip("/") and preassigned:
            return self.create(
                identity, path.strip("/"), resource, headers, resource_id=preassigned
            )
        if method == "PUT" and query_string and preassigned:
            return self._conditional_update(
                identity, path.strip("/"), params, resource, headers, resource_id=preassigned
            )
        return self.handle(identity, method, path, params, headers=headers, body=resource)

    def _resolve_placeholders(self, entries: list[dict[str, Any]]) -> None:
        """Give every ``urn:uuid`` entry its future id and rewrite references to it."""
        mapping: dict[str, str] = {}
        for entry in entries:
            full_url = str(entry.get("fullUrl", ""))
            resource = entry.get("resource")
            request = entry.get("request") or {}
            if not full_url.startswith("urn:uuid:") or not isinstance(resource, dict):
                continue
            resource_type = resource.get("resourceType")
            method = str(request.get("method", "")).upper()
            url = str(request.get("url", ""))
            target_id: str | None = None
            if method == "PUT" and "?" in url:
                query = SearchQuery.parse(
                    str(resource_type), parse_qsl(url.split("?", 1)[1], keep_blank_values=True)
                )
                found = self.store.search(query) if query.criteria else []
                target_id = found[0]["id"] if len(found) == 1 else None
            elif method == "POST" and request.get("ifNoneExist"):
                criteria = str(request["ifNoneExist"]).split("?", 1)[-1]
                query = SearchQuery.parse(
                    str(resource_type), parse_qsl(criteria, keep_blank_values=True)
                )
                found = self.store.search(query) if query.criteria else []
                target_id = found[0]["id"] if len(found) == 1 else None
            if target_id is None:
                target_id = str(uuid.uuid4())
                entry["_assigned_id"] = target_id
            mapping[full_url] = f"{resource_type}/{target_id}"
        for entry in entries:
            if isinstance(entry.get("resource"), dict):
                _rewrite_references(entry["resource"], mapping)

    def _response_entry(self, result: FhirResponse, prefer: str) -> dict[str, Any]:
        response: dict[str, Any] = {
            "status": f"{result.status} {_REASONS.get(result.status, '')}".strip()
        }
        if "Location" in result.headers:
            response["location"] = result.headers["Location"]
        if "ETag" in result.headers:
            response["etag"] = result.headers["ETag"]
        if "Last-Modified" in result.headers:
            response["lastModified"] = result.headers["Last-Modified"]
        entry: dict[str, Any] = {"response": response}
        is_outcome = (result.resource or {}).get("resourceType") == "OperationOutcome"
        if result.status >= 400 or is_outcome:
            response["outcome"] = result.resource
        elif result.resource is not None and "return=minimal" not in prefer:
            entry["resource"] = result.resource
            if result.resource.get("id") and result.resource.get("resourceType") != "Bundle":
                entry["fullUrl"] = (
                    f"{self.base_url}/{result.resource['resourceType']}/{result.resource['id']}"
                )
        return entry


_OPERATIONS = {"GET": "READ", "POST": "CREATE", "PUT": "UPDATE", "DELETE": "DELETE"}


def _role_lacking(
    identity: OrganizationIdentity, method: str, parts: Sequence[str]
) -> tuple[str, str | None] | None:
    """(operation, resource type) a practitioner's DSF roles lack for this request, else None.
    Organizations hold all roles they are ever asked for here (DSF: local all, remote create
    Task, read, search and history; the rules themselves refuse the rest)."""
    if not isinstance(identity, PractitionerIdentity) or not parts:
        return None
    resource_type = parts[0] if parts[0] != "_history" else None
    if "_history" in parts:
        operation = "HISTORY" if len(parts) != 4 else "READ"
    elif parts[-1] == "$permanent-delete":
        operation = "PERMANENT_DELETE"
    elif method == "GET" and len(parts) == 1:
        operation = "SEARCH"
    else:
        operation = _OPERATIONS.get(method.upper(), "")
    if not operation or identity.allows(operation, resource_type):
        return None
    return operation, resource_type


def _create_entry_invalid(index: int, entry: Mapping[str, Any]) -> FhirResponse | None:
    """DSF's ``CreateCommand.preExecute``: a create entry's request URL is a bare resource type,
    its ``fullUrl`` a ``urn:uuid:`` and a resource id, if any, that same ``urn:uuid:``; else 400
    for the entry (the whole Bundle for a transaction), with DSF's texts (typo included)."""
    request = entry.get("request") or {}
    if str(request.get("method", "")).upper() != "POST":
        return None
    url = str(request.get("url", ""))
    path, _, query = url.partition("?")
    full_url = entry.get("fullUrl")
    resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else {}
    resource_id = resource.get("id") if isinstance(resource, dict) else None
    if len([p for p in path.split("/") if p]) != 1 or query:
        return _error(400, f"Bad crete request url {url} at bundle index {index}")
    if not isinstance(full_url, str) or not full_url.startswith(_URL_UUID_PREFIX):
        return _error(400, f"Bad crete request url {url} at bundle index {index}")
    if isinstance(resource_id, str) and not resource_id.startswith(_URL_UUID_PREFIX):
        return _error(
            400,
            f"Bundle entry of type {path.strip('/')} at bundle index {index} id value not "
            f"starting with {_URL_UUID_PREFIX}",
        )
    if isinstance(resource_id, str) and resource_id != full_url:
        return _error(
            400,
            f"Resource id not equal to entry fullUrl ({resource_id} vs. {full_url}) at bundle "
            f"index {index}",
        )
    return None


_URL_UUID_PREFIX = "urn:uuid:"
_URL_VERSION_UNIQUE = frozenset(
    {"ActivityDefinition", "CodeSystem", "Library", "Measure", "StructureDefinition", "ValueSet"}
)


def _task_failed(resource: Mapping[str, Any]) -> bool:
    """DSF neither fails on validation errors nor checks references when a Task becomes
    ``failed`` (``ValidationRules``), so an engine can always give up on a Task."""
    return resource.get("resourceType") == "Task" and resource.get("status") == "failed"


def walk_references(node: Any) -> list[str]:
    """Every ``Reference.reference`` string in a resource."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(walk_references(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(walk_references(item))
    return found


def _identifiers(resource: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {
        (str(i.get("system")), str(i.get("value")))
        for i in resource.get("identifier") or []
        if isinstance(i, dict) and i.get("value")
    }


def _rewrite_references(node: Any, mapping: Mapping[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in mapping:
                node[key] = mapping[value]
            else:
                _rewrite_references(value, mapping)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, mapping)


_SECURITY_CONTEXT = re.compile(
    r"((http|https)://([A-Za-z0-9\-\\.:%$]*/)+)?"
    rf"(?P<type>{'|'.join(sorted(RESOURCE_TYPES))})/(?P<id>[A-Za-z0-9\-.]{{1,64}})"
    r"(/_history/(?P<version>[0-9]{1,18}))?"
)


def binary_resource(content_type: str, security_context: str) -> dict[str, Any]:
    """The Binary resource of a raw upload (DSF's ``BinaryServiceJaxrs.createBinary``): its
    content type and the ``X-Security-Context`` header as ``securityContext``; the content
    itself travels beside it (:class:`~dsf_bridge.sandbox.binaries.BinaryContent`)."""
    return {
        "resourceType": "Binary",
        "contentType": content_type,
        "securityContext": {"reference": security_context},
    }
