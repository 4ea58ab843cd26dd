"""A small FHIR server standing in for an OMI registry: what a FHIR R4 server does with the
resources and searches the bridge uses, no more.

- ``POST /{type}`` creates (``If-None-Exist``: a conditional create answers 200 with the match,
  412 with several); ``PUT /{type}/{id}`` updates (``If-Match: W/"n"`` must name the current
  version, else 412), ``GET /{type}/{id}`` reads; every write is validated as FHIR (R4B
  models) and gets ``meta.versionId`` and ``meta.lastUpdated``.
- ``GET /{type}?...`` searches by ``_id``, ``identifier``, ``active``, ``characteristic`` and
  ``service-type`` (tokens ``system|code``; a comma is "or", a repeated parameter "and",
  ``\\,`` an escaped comma) with ``_include`` of ``HealthcareService:endpoint`` and
  ``HealthcareService:organization``; any other parameter is refused with 400, as a strict
  server does (``handling=strict``), so a client cannot rely on one the server ignores.

``writes`` counts the writes that changed something; ``up`` False answers 503 to everything
(a registry that is down). The fixtures ``registry`` (a fresh one) and ``client`` (a
:class:`~dsf_bridge.omi.registry.FhirRegistryClient` talking to it in-process) are for the
tests that import them.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dsf_bridge.omi.registry import FhirRegistryClient

__all__ = ["FhirRegistry", "client", "registry"]

_SEARCH = {"_id", "identifier", "active", "characteristic", "service-type", "_include", "_count"}
_TOKEN_ELEMENTS = {"characteristic": "characteristic", "service-type": "type"}


def _split(value: str, separator: str) -> list[str]:
    """Split at separators not escaped by a backslash (the parts stay escaped)."""
    return re.split(rf"(?<!\\){re.escape(separator)}", value)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def _token(value: str) -> tuple[str | None, str]:
    """``system|code`` (or ``code``: any system) of a token search value."""
    parts = _split(value, "|")
    if len(parts) == 1:
        return None, _unescape(parts[0])
    return _unescape(parts[0]), _unescape("|".join(parts[1:]))


class FhirRegistry:
    def __init__(self) -> None:
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        self.writes = 0
        self.requests: list[tuple[str, str]] = []
        self.up = True
        self._ids = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/fhir/{kind}", self._type, methods=["GET", "POST"]),
                Route("/fhir/{kind}/{id}", self._instance, methods=["GET", "PUT"]),
            ]
        )

    def all(self, kind: str) -> list[dict[str, Any]]:
        return list(self.resources.get(kind, {}).values())

    # -- endpoints -----------------------------------------------------------------------

    async def _type(self, request: Request) -> Response:
        self.requests.append((request.method, str(request.url)))
        if not self.up:
            return Response(status_code=503)
        kind = request.path_params["kind"]
        if request.method == "GET":
            return self.search(kind, list(request.query_params.multi_items()))
        resource = await request.json()
        condition = request.headers.get("If-None-Exist")
        if condition:
            found = self._matches(kind, parse_qsl(condition))
            if isinstance(found, Response):
                return found
            if len(found) > 1:
                return _outcome(412, "If-None-Exist matches more than one resource")
            if found:
                return JSONResponse(found[0], status_code=200)
        resource["id"] = str(next(self._ids))
        return self._store(kind, resource, "1", status=201)

    async def _instance(self, request: Request) -> Response:
        self.requests.append((request.method, str(request.url)))
        if not self.up:
            return Response(status_code=503)
        kind, rid = request.path_params["kind"], request.path_params["id"]
        current = self.resources.get(kind, {}).get(rid)
        if request.method == "GET":
            return JSONResponse(current) if current else _outcome(404, "not found")
        resource = await request.json()
        if resource.get("id") != rid:
            return _outcome(400, "the id in the URL and the resource differ")
        if current is None:
            return self._store(kind, resource, "1", status=201)
        version = current["meta"]["versionId"]
        match = request.headers.get("If-Match")
        if match is not None and match not in (f'W/"{version}"', f'"{version}"'):
            return _outcome(412, f"version {version} is current, not {match}")
        return self._store(kind, resource, str(int(version) + 1), status=200)

    # -- helpers -------------------------------------------------------------------------

    def _store(self, kind: str, resource: dict[str, Any], version: str, *, status: int) -> Response:
        if resource.get("resourceType") != kind:
            return _outcome(400, "resourceType does not match the URL")
        resource["meta"] = {
            "versionId": version,
            "lastUpdated": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        }
        try:
            get_fhir_model_class(kind).model_validate(resource)
        except ValidationError as exc:
            return _outcome(400, f"invalid {kind}: {exc}")
        self.resources.setdefault(kind, {})[resource["id"]] = copy.deepcopy(resource)
        self.writes += 1
        return JSONResponse(
            resource,
            status_code=status,
            headers={"Location": f"/fhir/{kind}/{resource['id']}/_history/{version}"},
        )

    def _matches(self, kind: str, params: list[tuple[str, str]]) -> list[dict[str, Any]] | Response:
        found = self.all(kind)
        for name, value in params:
            if name not in _SEARCH:
                return _outcome(400, f"unknown search parameter {name}")
            if name in ("_include", "_count"):
                continue
            alternatives = _split(value, ",")
            found = [r for r in found if any(_has(r, name, a) for a in alternatives)]
        return found

    def search(self, kind: str, params: list[tuple[str, str]]) -> Response:
        """A search's answer (a Bundle, or 400 for a parameter this server does not know)."""
        found = self._matches(kind, params)
        if isinstance(found, Response):
            return found
        entries = [{"resource": r, "search": {"mode": "match"}} for r in found]
        included: dict[str, dict[str, Any]] = {}
        for name, value in params:
            if name != "_include":
                continue
            if value == "HealthcareService:endpoint":
                for r in found:
                    for ref in r.get("endpoint") or ():
                        target = self._resolve(ref.get("reference", ""))
                        if target:
                            included[ref["reference"]] = target
            elif value == "HealthcareService:organization":
                for r in found:
                    target = self._resolve((r.get("providedBy") or {}).get("reference", ""))
                    if target:
                        included[r["providedBy"]["reference"]] = target
            else:
                return _outcome(400, f"unsupported _include {value}")
        entries += [{"resource": r, "search": {"mode": "include"}} for r in included.values()]
        return JSONResponse(
            {"resourceType": "Bundle", "type": "searchset", "total": len(found), "entry": entries}
        )

    def _resolve(self, reference: str) -> dict[str, Any] | None:
        kind, _, rid = reference.partition("/")
        return self.resources.get(kind, {}).get(rid)


def _has(resource: dict[str, Any], name: str, value: str) -> bool:
    if name == "_id":
        return resource.get("id") == _unescape(value)
    if name == "active":
        return str(resource.get("active", False)).lower() == value
    system, code = _token(value)
    if name == "identifier":
        pairs = [(i.get("system"), i.get("value")) for i in resource.get("identifier") or ()]
    else:
        concepts = resource.get(_TOKEN_ELEMENTS[name]) or ()
        pairs = [
            (c.get("system"), c.get("code"))
            for concept in concepts
            for c in concept.get("coding") or ()
        ]
    return any(c == code and (system is None or s == system) for s, c in pairs)


def _outcome(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": message}],
        },
        status_code=status,
    )


@pytest.fixture
def registry() -> FhirRegistry:
    return FhirRegistry()


@pytest.fixture
async def client(registry: FhirRegistry) -> AsyncIterator[FhirRegistryClient]:
    transport = httpx.ASGITransport(app=registry.app)
    async with FhirRegistryClient("http://registry.test/fhir", transport=transport) as client:
        yield client
