"""Binary over real TLS as the DSF FHIR server serves it: read access through the security
context, the raw upload and its ``X-Security-Context`` header, raw and FHIR reads, byte ranges
(2.x) and bodies streamed through the sandbox without being held in memory.

Three organizations: ``Site_A`` (local), ``Site_B`` (the one the security context admits) and
``Site_C`` (a third organization of the same allow list)."""

from __future__ import annotations

import base64
import gc
import json
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.versions import DSF_1, DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import (
    ORGANIZATION_IDENTIFIER_SYSTEM,
    READ_ACCESS_ORGANIZATION_EXTENSION,
    READ_ACCESS_TAG_SYSTEM,
)
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import SiteFiles, build_service, init_sandbox

LOCAL, REMOTE, THIRD = "Site_A", "Site_B", "Site_C"
MB = 1024 * 1024


@dataclass
class Network:
    server: SandboxServer
    sites: dict[str, SiteFiles]

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def context(self, organization: str) -> ssl.SSLContext:
        site = self.sites[organization]
        return build_ssl_context(load_identity(site.client_certificate, site.client_key), [site.ca])

    def http(self, organization: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url + "/", verify=self.context(organization), timeout=60
        )


async def _network(tmp_path: Path, release: DsfRelease) -> AsyncIterator[Network]:
    ca = CertificateAuthority("binary test CA")
    sites = {
        s.organization: s for s in init_sandbox(tmp_path / "sandbox", [LOCAL, REMOTE, THIRD], ca=ca)
    }
    site = sites[LOCAL]
    service = build_service(
        LOCAL, json.loads(site.allow_list.read_text()), site.base_url, dsf_release=release
    )
    async with SandboxServer(
        service, certificate=site.server_certificate, key=site.server_key, ca_files=[site.ca]
    ) as server:
        yield Network(server, sites)


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    async for network in _network(tmp_path, DSF_2):
        yield network


@pytest.fixture
async def network_1_9(tmp_path: Path) -> AsyncIterator[Network]:
    async for network in _network(tmp_path, DSF_1):
        yield network


def _readable_by(organization: str) -> dict[str, Any]:
    """The tags DSF needs for "readable by the local organization and ``organization``"."""
    return {
        "tag": [
            {"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"},
            {
                "system": READ_ACCESS_TAG_SYSTEM,
                "code": "ORGANIZATION",
                "extension": [
                    {
                        "url": READ_ACCESS_ORGANIZATION_EXTENSION,
                        "valueIdentifier": {
                            "system": ORGANIZATION_IDENTIFIER_SYSTEM,
                            "value": organization,
                        },
                    }
                ],
            },
        ]
    }


async def _security_context(network: Network, organization: str) -> str:
    """A ResearchStudy readable by the local organization and ``organization`` only."""
    async with network.http(LOCAL) as http:
        response = await http.post(
            "ResearchStudy",
            json={
                "resourceType": "ResearchStudy",
                "meta": _readable_by(organization),
                "status": "active",
            },
            headers={"Content-Type": "application/fhir+json"},
        )
    assert response.status_code == 201, response.text
    return f"ResearchStudy/{response.json()['id']}"


async def _upload(
    network: Network, content: bytes, security_context: str, content_type: str = "text/plain"
) -> str:
    async with network.http(LOCAL) as http:
        response = await http.post(
            "Binary",
            content=content,
            headers={
                "Content-Type": content_type,
                "X-Security-Context": security_context,
                "Prefer": "return=minimal",
            },
        )
    assert response.status_code == 201, response.text
    return response.headers["location"].split("/Binary/")[1].split("/")[0]


async def test_a_third_organization_cannot_read_what_the_security_context_keeps_from_it(
    network: Network,
) -> None:
    """DSF answers 403 (``Operation read forbidden``) for a Binary the caller may not read,
    as for any existing resource it may not read; B and the local organization read it."""
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"for B only", context)
    answers: dict[str, httpx.Response] = {}
    for organization in (LOCAL, REMOTE, THIRD):
        async with network.http(organization) as http:
            answers[organization] = await http.get(
                f"Binary/{binary_id}", headers={"Accept": "text/plain"}
            )
    assert answers[LOCAL].status_code == 200 and answers[LOCAL].content == b"for B only"
    assert answers[REMOTE].status_code == 200 and answers[REMOTE].content == b"for B only"
    assert answers[THIRD].status_code == 403
    assert answers[THIRD].json()["issue"][0]["diagnostics"] == "Operation read forbidden"
    assert answers[REMOTE].headers["x-security-context"] == context


async def test_the_read_access_follows_the_security_context_when_it_changes(
    network: Network,
) -> None:
    """``on_resources_insert.sql``: a new version of the security context renews the Binary's
    read access; deleting it takes the access away (``on_resources_update.sql``)."""
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"moving", context)
    async with network.http(LOCAL) as local:
        study = (await local.get(context)).json()
        study["meta"] = _readable_by(THIRD)
        updated = await local.put(
            context, json=study, headers={"Content-Type": "application/fhir+json"}
        )
        assert updated.status_code == 200, updated.text
    async with network.http(REMOTE) as remote, network.http(THIRD) as third:
        assert (await remote.get(f"Binary/{binary_id}")).status_code == 403
        assert (await third.get(f"Binary/{binary_id}")).status_code == 200
    async with network.http(LOCAL) as local:
        assert (await local.delete(context)).status_code == 200
        assert (await local.get(f"Binary/{binary_id}")).status_code == 403


async def test_a_raw_upload_needs_one_security_context_header(network: Network) -> None:
    """``BinaryServiceJaxrs.getHeaderValueOrThrowBadRequest``: absent, blank or repeated is a
    bare 400; a security context DSF does not accept (a Task, or nothing that resolves) is 403
    from ``BinaryAuthorizationRule``."""
    async with network.http(LOCAL) as http:
        missing = await http.post("Binary", content=b"x", headers={"Content-Type": "text/plain"})
        blank = await http.post(
            "Binary", content=b"x", headers={"Content-Type": "text/plain", "X-Security-Context": ""}
        )
        twice = await http.post(
            "Binary",
            content=b"x",
            headers=[
                ("Content-Type", "text/plain"),
                ("X-Security-Context", "Organization/a"),
                ("X-Security-Context", "Organization/b"),
            ],
        )
        unknown = await http.post(
            "Binary",
            content=b"x",
            headers={"Content-Type": "text/plain", "X-Security-Context": "ResearchStudy/nope"},
        )
    assert [r.status_code for r in (missing, blank, twice)] == [400, 400, 400]
    assert missing.content == b""
    assert unknown.status_code == 403
    assert network.server.service.store.all("Binary") == []


async def test_a_remote_organization_may_not_upload(
    network: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before the body is read: DSF authorizes the Binary (content type, security
    context) before its DAO streams the data, so a refused upload costs no disk."""
    context = await _security_context(network, REMOTE)
    service = network.server.service
    received: list[str] = []
    receive = service.binaries.receive

    async def spy(body: Any) -> Any:
        received.append("read")
        return await receive(body)

    monkeypatch.setattr(service.binaries, "receive", spy)
    async with network.http(REMOTE) as http:
        response = await http.post(
            "Binary",
            content=b"x",
            headers={"Content-Type": "text/plain", "X-Security-Context": context},
        )
    async with network.http(LOCAL) as http:
        allowed = await http.post(
            "Binary",
            content=b"x",
            headers={"Content-Type": "text/plain", "X-Security-Context": context},
        )
    assert response.status_code == 403
    assert response.json()["issue"][0]["diagnostics"] == "Operation create forbidden"
    assert allowed.status_code == 201
    assert received == ["read"]  # the local organization's upload only


async def test_reads_as_fhir_json_raw_and_not_acceptable(network: Network) -> None:
    content = bytes(range(256)) * 10
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, content, context, "application/octet-stream")
    async with network.http(REMOTE) as http:
        as_fhir = await http.get(f"Binary/{binary_id}", headers={"Accept": "application/fhir+json"})
        wildcard = await http.get(f"Binary/{binary_id}", headers={"Accept": "*/*"})
        no_accept = await http.get(f"Binary/{binary_id}", headers={"Accept": ""})
        as_xml = await http.get(f"Binary/{binary_id}", headers={"Accept": "application/xml"})
        with_charset = await http.get(
            f"Binary/{binary_id}", headers={"Accept": "application/fhir+json;charset=utf-8"}
        )
        vread = await http.get(
            f"Binary/{binary_id}/_history/1", headers={"Accept": "application/octet-stream"}
        )
    resource = as_fhir.json()
    assert resource["resourceType"] == "Binary"
    assert base64.b64decode(resource["data"]) == content
    assert resource["securityContext"] == {"reference": context}
    assert wildcard.content == content and no_accept.content == content
    assert wildcard.headers["content-length"] == str(len(content))
    assert wildcard.headers["accept-ranges"] == "bytes"
    assert wildcard.headers["content-disposition"] == f"attachment; filename=Binary_{binary_id}.bin"
    assert wildcard.headers["etag"] == 'W/"1"'
    # Not a FHIR media type as DSF compares it, and not compatible with the content: 406.
    assert as_xml.status_code == 406 and with_charset.status_code == 406
    assert vread.content == content


async def test_a_raw_update_makes_a_new_version_with_new_content(network: Network) -> None:
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"first", context)
    async with network.http(LOCAL) as http:
        updated = await http.put(
            f"Binary/{binary_id}",
            content=b"second",
            headers={"Content-Type": "text/plain", "X-Security-Context": context},
        )
        first = await http.get(f"Binary/{binary_id}/_history/1", headers={"Accept": "*/*"})
        current = await http.get(f"Binary/{binary_id}", headers={"Accept": "*/*"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2"
    assert first.content == b"first" and current.content == b"second"


async def test_ranges_as_dsf_2(network: Network) -> None:
    """DSF 2.x's ``RangeRequestImpl`` as ``BinaryIntegrationTest.testCreateReadRange`` uses
    it, and its edges: ``bytes=0-0`` and a range past the end are not satisfiable (416)."""
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, bytes(range(10)), context, "application/octet-stream")
    results: dict[str, httpx.Response] = {}
    async with network.http(LOCAL) as http:
        for header in ("bytes=0-1", "bytes=2-3", "bytes=4-", "bytes=-2", "bytes=0-0", "bytes=5-10"):
            results[header] = await http.get(
                f"Binary/{binary_id}",
                headers={"Accept": "application/octet-stream", "Range": header},
            )
        garbage = await http.get(
            f"Binary/{binary_id}", headers={"Accept": "application/octet-stream", "Range": "x"}
        )
    assert results["bytes=0-1"].status_code == 206
    assert results["bytes=0-1"].content == bytes([0, 1])
    assert results["bytes=0-1"].headers["content-range"] == "bytes 0-1/10"
    assert results["bytes=2-3"].content == bytes([2, 3])
    assert results["bytes=4-"].content == bytes(range(4, 10))
    assert results["bytes=-2"].content == bytes([8, 9])
    assert results["bytes=-2"].headers["content-range"] == "bytes 8-9/10"
    assert results["bytes=0-0"].status_code == 416
    assert results["bytes=0-0"].headers["content-range"] == "bytes */10"
    assert results["bytes=5-10"].status_code == 416
    assert garbage.status_code == 200 and garbage.content == bytes(range(10))


async def test_dsf_1_9_has_no_ranges_and_no_head(network_1_9: Network) -> None:
    context = await _security_context(network_1_9, REMOTE)
    binary_id = await _upload(network_1_9, bytes(range(10)), context, "application/octet-stream")
    async with network_1_9.http(LOCAL) as http:
        ranged = await http.get(
            f"Binary/{binary_id}",
            headers={"Accept": "application/octet-stream", "Range": "bytes=0-1"},
        )
        head = await http.head(f"Binary/{binary_id}", headers={"Accept": "*/*"})
    assert ranged.status_code == 200 and ranged.content == bytes(range(10))
    assert "accept-ranges" not in ranged.headers and "content-disposition" not in ranged.headers
    assert head.status_code == 405


async def test_head_as_dsf_2(network: Network) -> None:
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"0123456789", context)
    async with network.http(LOCAL) as http:
        head = await http.head(f"Binary/{binary_id}", headers={"Accept": "text/plain"})
    assert head.status_code == 200
    assert head.headers["content-length"] == "10"
    assert head.content == b""


async def test_delete_and_permanent_delete_remove_the_content(network: Network) -> None:
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"short-lived", context)
    service = network.server.service
    async with network.http(REMOTE) as remote:
        assert (await remote.delete(f"Binary/{binary_id}")).status_code == 403
    async with network.http(LOCAL) as http:
        assert (await http.delete(f"Binary/{binary_id}")).status_code == 200
        assert (await http.get(f"Binary/{binary_id}")).status_code == 410
        assert service.binaries.get(binary_id, "1") is not None  # history keeps it, as DSF
        # An operation on a Binary is no upload, whatever Content-Type the client sends.
        purged = await http.post(
            f"Binary/{binary_id}/$permanent-delete", headers={"Content-Type": "text/plain"}
        )
    assert purged.status_code == 200
    assert service.binaries.get(binary_id, "1") is None


async def _chunks(total: int, size: int = MB) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        sent += len(piece)
        yield piece


async def test_fifty_megabytes_pass_through_without_being_held(network: Network) -> None:
    """Upload and download of 50 MB: the Python heap (client and sandbox share this process)
    grows by a small fraction of the body, never by the body."""
    total = 50 * MB
    context = await _security_context(network, REMOTE)
    gc.collect()
    tracemalloc.start()
    try:
        async with network.http(LOCAL) as http:
            created = await http.post(
                "Binary",
                content=_chunks(total),
                headers={
                    "Content-Type": "application/octet-stream",
                    "X-Security-Context": context,
                    "Prefer": "return=minimal",
                },
            )
        binary_id = created.headers["location"].split("/Binary/")[1].split("/")[0]
        received = 0
        async with (
            network.http(REMOTE) as http,
            http.stream(
                "GET", f"Binary/{binary_id}", headers={"Accept": "application/octet-stream"}
            ) as response,
        ):
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert created.status_code == 201
    assert received == total
    stored = network.server.service.binaries.get(binary_id, "1")
    assert stored is not None and stored.size == total
    assert peak < 12 * MB, f"peak {peak / MB:.1f} MB for a {total // MB} MB body"


async def test_an_unknown_format_is_refused_with_415(network: Network) -> None:
    """DSF answers a Binary read whose ``_format`` it does not know with a bare 415 (2.1
    ``BinaryServiceJaxrs.getValidFhirMediaType`` lines 377-381 calling
    ``ParameterConverter.getMediaTypeThrowIfNotSupported``, lines 104-135; 1.9 the same at
    ``BinaryServiceJaxrs`` line 222); the sandbox used to take any ``_format`` as "FHIR JSON,
    please" and served the resource."""
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"payload", context)
    async with network.http(REMOTE) as http:
        unknown = await http.get(f"Binary/{binary_id}", params={"_format": "text/plain"})
        blank_with_text = await http.get(
            f"Binary/{binary_id}", params={"_format": ""}, headers={"Accept": "text/plain"}
        )
        known = await http.get(f"Binary/{binary_id}", params={"_format": "json"})
        blank_with_wildcard = await http.get(
            f"Binary/{binary_id}", params={"_format": ""}, headers={"Accept": "*/*"}
        )
    assert unknown.status_code == 415 and blank_with_text.status_code == 415
    assert known.status_code == 200 and known.json()["resourceType"] == "Binary"
    assert blank_with_wildcard.status_code == 200
    assert blank_with_wildcard.json()["resourceType"] == "Binary"


async def test_a_search_by_content_type(network: Network) -> None:
    """DSF searches Binaries by ``contentType``, exactly (2.1 ``BinaryDaoJdbc`` lines 63-65,
    ``search/parameters/BinaryContentType.java``: ``binary_json->>'contentType' = ?``); the
    sandbox ignored the parameter as unknown and answered every Binary."""
    context = await _security_context(network, REMOTE)
    text_id = await _upload(network, b"text", context, "text/plain")
    pdf_id = await _upload(network, b"%PDF", context, "application/pdf")
    async with network.http(LOCAL) as http:
        text = await http.get("Binary", params={"contentType": "text/plain"})
        pdf = await http.get("Binary", params={"contentType": "application/pdf"})
        other = await http.get("Binary", params={"contentType": "text/csv"})

    def ids(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        return [e["resource"]["id"] for e in response.json().get("entry", [])]

    assert ids(text) == [text_id] and ids(pdf) == [pdf_id] and ids(other) == []


async def test_a_raw_upload_keeps_the_whole_content_type(network: Network) -> None:
    """DSF makes ``Binary.contentType`` of the raw upload's ``Content-Type`` header as sent,
    parameters included (2.1 ``BinaryServiceJaxrs.getContentType`` and ``createBinary``, lines
    118-121 and 104-111: ``resource.setContentType(contentType)`` with the header's value); the
    sandbox dropped ``; charset=...``, so the resource, the raw read's ``Content-Type`` and a
    ``contentType`` search differed from DSF's."""
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"text", context, "text/plain; charset=utf-8")
    async with network.http(REMOTE) as http:
        resource = await http.get(
            f"Binary/{binary_id}", headers={"Accept": "application/fhir+json"}
        )
        raw = await http.get(f"Binary/{binary_id}", headers={"Accept": "text/plain"})
    assert resource.json()["contentType"] == "text/plain; charset=utf-8"
    assert raw.status_code == 200 and raw.content == b"text"
    assert raw.headers["content-type"] == "text/plain; charset=utf-8"


async def test_document_reference_and_binary_know_only_dsf_search_parameters(
    network: Network,
) -> None:
    """DSF's DocumentReference knows ``identifier`` only, its Binary ``contentType`` only (2.1
    ``DocumentReferenceDaoJdbc`` lines 38-39, ``BinaryDaoJdbc`` lines 63-65, besides ``_id``,
    ``_lastUpdated`` and ``_profile`` of ``AbstractResourceDaoJdbc`` lines 208-213); another
    parameter is unknown: ignored with a warning, 400 with ``handling=strict``. The sandbox
    filtered by ``status`` and ``_tag`` all the same and hid what DSF answers."""
    async with network.http(LOCAL) as http:
        created = await http.post(
            "DocumentReference",
            json={
                "resourceType": "DocumentReference",
                "meta": _readable_by(REMOTE),
                "status": "current",
                "content": [{"attachment": {"contentType": "text/plain"}}],
            },
            headers={"Content-Type": "application/fhir+json"},
        )
        assert created.status_code == 201, created.text
        by_status = await http.get("DocumentReference", params={"status": "superseded"})
        strict = await http.get(
            "DocumentReference",
            params={"status": "superseded"},
            headers={"Prefer": "handling=strict"},
        )
    context = await _security_context(network, REMOTE)
    binary_id = await _upload(network, b"text", context)
    async with network.http(LOCAL) as http:
        binary_by_tag = await http.get("Binary", params={"_tag": "nothing|such"})
    entries = [e["resource"] for e in by_status.json().get("entry", []) if "resource" in e]
    assert [r["id"] for r in entries if r["resourceType"] == "DocumentReference"] == [
        created.json()["id"]
    ]
    assert strict.status_code == 400
    binaries = [e["resource"] for e in binary_by_tag.json().get("entry", []) if "resource" in e]
    assert [r["id"] for r in binaries if r["resourceType"] == "Binary"] == [binary_id]


async def test_an_organization_tag_must_name_an_organization_the_server_knows(
    network: Network,
) -> None:
    """DSF's read-access tags are valid only when an ORGANIZATION tag (and a ROLE tag's parent
    organization) names an Organization on the server (2.1 ``ReadAccessHelperImpl.isValid``
    lines 365-370 with ``AbstractMetaTagAuthorizationRule.hasValidReadAccessTag`` lines
    55-60 passing ``organizationWithIdentifierExists``, ``AbstractAuthorizationRule`` lines
    197-219); a Binary (or any tagged resource) readable by an unknown organization is refused
    with 403. The sandbox only checked that the extension was there."""
    tagged = {"resourceType": "Binary", "contentType": "text/plain", "data": "dGV4dA=="}
    async with network.http(LOCAL) as http:
        unknown = await http.post(
            "Binary",
            json={**tagged, "meta": _readable_by("unknown.example.org")},
            headers={"Content-Type": "application/fhir+json"},
        )
        known = await http.post(
            "Binary",
            json={**tagged, "meta": _readable_by(REMOTE)},
            headers={"Content-Type": "application/fhir+json"},
        )
    # DSF's body names no reason ("Operation create forbidden"); the sandbox logs it.
    assert unknown.status_code == 403, unknown.text
    assert known.status_code == 201, known.text
