"""The sandbox on the wire: a Starlette app serving :class:`FhirService` under ``/fhir`` and the
DSF websocket ``/fhir/ws``, run by uvicorn in-process with TLS and ``CERT_REQUIRED``.

uvicorn does not hand the client certificate to the application, so two small protocol
subclasses read it from the TLS transport when a connection is made and put it into the ASGI
scope as the TLS extension's ``client_cert_chain`` (PEM), which the app turns into a thumbprint.

Websocket protocol as DSF's ``ServerEndpoint``: text ``bind <subscription id>`` answers
``bound <id>``; then one text frame per created or updated resource that matches the
Subscription's criteria (the resource as JSON when ``channel.payload`` is
``application/fhir+json``, else ``ping <id>``). An unknown subscription closes with 1003
(cannot accept); an unknown certificate or a remote organization (DSF gives the websocket role
to the local organization only) with 1008 (policy violation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, cast

import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from dsf_bridge.api.server import EmbeddedUvicorn
from dsf_bridge.dsf.identity import thumbprint
from dsf_bridge.dsf.vocabulary import FHIR_JSON, operation_outcome
from dsf_bridge.sandbox.authorization import OrganizationIdentity, PractitionerIdentity
from dsf_bridge.sandbox.binaries import (
    BinaryContent,
    ByteRange,
    accepts,
    fhir_media_type_requested,
    format_supported,
)
from dsf_bridge.sandbox.resources import matches
from dsf_bridge.sandbox.service import FhirResponse, FhirService, binary_resource, unparsable

__all__ = [
    "SandboxServer",
    "SubscriptionHub",
    "certificate_email",
    "create_app",
    "server_ssl_context",
]

_log = structlog.get_logger()

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CLOSE_CANNOT_ACCEPT = 1003
CLOSE_VIOLATED_POLICY = 1008


def _peer_certificate_pem(transport: asyncio.BaseTransport) -> str | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der) if der else None


def _with_peer_certificate(app: App, pem: str | None) -> App:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions["tls"] = {"client_cert_chain": [pem] if pem else [], "server_cert": None}
        scope["extensions"] = extensions
        await app(scope, receive, send)

    return wrapped


class _PeerCertificateH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _with_peer_certificate(self.app, _peer_certificate_pem(transport))


class _PeerCertificateWebSocketProtocol(WebSocketsSansIOProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.app = _with_peer_certificate(cast(App, self.app), _peer_certificate_pem(transport))


def _scope_certificate(scope: Scope) -> x509.Certificate | None:
    chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or []
    if not chain:
        return None
    return x509.load_pem_x509_certificate(chain[0].encode("ascii"))


def certificate_email(certificate: x509.Certificate) -> str | None:
    """The e-mail a practitioner certificate names, where DSF's ``AbstractIdentityProvider``
    looks: subject ``E``/``emailAddress``, then the rfc822Name subject alternative names."""
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        return str(attribute.value)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    emails = names.value.get_values_for_type(x509.RFC822Name)
    return emails[0] if emails else None


class SubscriptionHub:
    """Bound websocket sessions per Subscription id; fans out resource events to them."""

    def __init__(self, service: FhirService) -> None:
        self._service = service
        # Subscription id -> {id(queue): (identity, queue)}; identities are not hashable.
        self._sessions: dict[str, dict[int, tuple[OrganizationIdentity, asyncio.Queue[str]]]] = {}
        service.store.add_listener(self._on_event)

    def subscription(self, subscription_id: str) -> dict[str, Any] | None:
        subscription = self._service.store.read("Subscription", subscription_id)
        if subscription is None or subscription.get("status") != "active":
            return None
        if (subscription.get("channel") or {}).get("type") != "websocket":
            return None
        return subscription

    def bind(
        self, subscription_id: str, identity: OrganizationIdentity, queue: asyncio.Queue[str]
    ) -> None:
        self._sessions.setdefault(subscription_id, {})[id(queue)] = (identity, queue)

    def unbind(self, queue: asyncio.Queue[str]) -> None:
        for sessions in self._sessions.values():
            sessions.pop(id(queue), None)

    def _on_event(self, resource: dict[str, Any]) -> None:
        for subscription_id, sessions in self._sessions.items():
            if not sessions:
                continue
            subscription = self.subscription(subscription_id)
            if subscription is None or not matches(resource, str(subscription.get("criteria", ""))):
                continue
            payload = (subscription.get("channel") or {}).get("payload")
            text = json.dumps(resource) if payload == FHIR_JSON else f"ping {subscription_id}"
            for identity, queue in list(sessions.values()):
                if self._service.may_read(identity, resource):
                    queue.put_nowait(text)


# The media types DSF's BinaryServiceJaxrs reads as a FHIR resource on POST and PUT (@Consumes);
# any other body is the raw content of a Binary.
_FHIR_BODY_TYPES = frozenset(
    {
        "application/fhir+json",
        "application/json+fhir",
        "application/json",
        "application/fhir+xml",
        "application/xml+fhir",
        "application/xml",
    }
)
# ResponseGenerator.PRIVATE_NO_CACHE_NO_TRANSFORM as JAX-RS writes it.
_CACHE_CONTROL = "private, no-cache, no-transform"
_FILE_EXTENSIONS = {
    "image/jpeg": ".jpeg",
    "image/png": ".png",
    "image/svg+xml": ".svg",
    "image/tiff": ".tiff",
    "text/csv": ".csv",
    "text/html": ".html",
    "text/plain": ".txt",
    "application/dicom": ".dicom",
    "application/dicom+json": ".json",
    "application/dicom+xml": ".xml",
    "application/gzip": ".gz",
    "application/json": ".json",
    "application/pdf": ".pdf",
    "application/pem-certificate-chain": ".pem",
    "application/x-ndjson": ".ndjson",
    "application/xml": ".xml",
    "application/zip": ".zip",
}


# Bundles the server writes from what it stores (their Binaries' content is in its files).
_SERVER_BUNDLES = frozenset({"searchset", "history", "batch-response", "transaction-response"})


def _inline_binaries(service: FhirService, body: dict[str, Any]) -> dict[str, Any]:
    """Bundles (search, history, batch answers) carry their Binaries with ``data``, as DSF
    writes them; only a Binary read on its own is streamed."""
    if body.get("resourceType") != "Bundle" or body.get("type") not in _SERVER_BUNDLES:
        return body  # a stored Bundle (a document, a collection) holds its Binaries itself
    for entry in body.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
            continue
        version = (resource.get("meta") or {}).get("versionId")
        if not resource.get("id") or not version:
            continue
        content = service.binaries.get(resource["id"], version)
        if content is not None and content.size:
            entry["resource"] = {**resource, "data": content.base64()}
    return body


async def _json_with_data(resource: dict[str, Any], content: BinaryContent) -> AsyncIterator[bytes]:
    """A Binary resource as JSON with its content as ``data``, written as it is read."""
    text = json.dumps(resource)
    if not content.size:
        yield text.encode()
        return
    yield (text[:-1] + ', "data": "').encode()
    async for chunk in content.base64_chunks():
        yield chunk
    yield b'"}'


def _render(
    service: FhirService, response: FhirResponse, prefer: str, accept: str, *, head: bool = False
) -> Response:
    headers = dict(response.headers)
    body: dict[str, Any] | None = response.resource
    if response.status < 400 and body is not None:
        if "return=minimal" in prefer:
            body = None
        elif "return=OperationOutcome" in prefer:
            body = operation_outcome("ok", severity="information", code="informational")
    if body is None:
        return Response(status_code=response.status, headers=headers)
    if response.content is not None and body.get("resourceType") == "Binary":
        media_type = f"{FHIR_JSON};charset=UTF-8"
        if head:
            return Response(status_code=response.status, headers=headers, media_type=media_type)
        return StreamingResponse(
            _json_with_data(body, response.content),
            status_code=response.status,
            headers=headers,
            media_type=media_type,
        )
    return Response(
        json.dumps(_inline_binaries(service, body)),
        status_code=response.status,
        headers=headers,
        media_type=f"{FHIR_JSON};charset=UTF-8",
    )


def _render_binary(
    service: FhirService,
    response: FhirResponse,
    request: Request,
    *,
    head: bool,
) -> Response:
    """A Binary read as DSF's ``BinaryServiceJaxrs`` answers it: the resource (JSON) when the
    first ``Accept`` type is a FHIR media type or ``_format`` is given, else the raw content
    if an ``Accept`` type is compatible with the Binary's content type (406 if none is).
    2.x: ``Content-Length``, ``Accept-Ranges: bytes``, a ``Range`` (206, or 416 when not
    satisfiable), ``Content-Disposition: attachment``, ``Vary: Accept``; 1.9: none of these."""
    accept = request.headers.get("accept", "")
    resource = response.resource or {}
    content = response.content
    format_parameter = request.query_params.get("_format")
    if format_parameter is not None and not format_supported(
        format_parameter, accept, inline=service.release.major >= 2
    ):
        # BinaryServiceJaxrs.getValidFhirMediaType: an unknown _format is a bare 415.
        _log.warning("binary.read_refused", reason="unsupported _format")
        return Response(status_code=415)
    if content is None or fhir_media_type_requested(accept, format_parameter):
        return _render(service, response, "", accept, head=head)
    content_type = str(resource.get("contentType") or "application/octet-stream")
    if not accepts(accept, content_type):
        return Response(status_code=406)
    headers = {
        "Cache-Control": _CACHE_CONTROL,
        "ETag": f'W/"{resource["meta"]["versionId"]}"',
        "Last-Modified": response.headers.get("Last-Modified", ""),
    }
    reference = (resource.get("securityContext") or {}).get("reference")
    if reference:
        headers["X-Security-Context"] = str(reference)
    start, length = 0, content.size
    status = 200
    if service.release.major >= 2:
        headers["Vary"] = "Accept"
        headers["Accept-Ranges"] = "bytes"
        extension = _FILE_EXTENSIONS.get(content_type, ".bin")
        headers["Content-Disposition"] = f"attachment; filename=Binary_{resource['id']}{extension}"
        byte_range = ByteRange.parse(request.headers.get("range"))
        span = None if head else byte_range.span(content.size)
        if not head and span is None:
            return Response(
                b"", status_code=416, headers={"Content-Range": f"bytes */{content.size}"}
            )
        if span is not None and byte_range.defined:
            start, length = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{content.size}"
        headers["Content-Length"] = str(length)
    if head:
        return Response(status_code=status, headers=headers, media_type=content_type)
    return StreamingResponse(
        content.chunks(start, length), status_code=status, headers=headers, media_type=content_type
    )


def _header_once(request: Request, name: str) -> str | None:
    """The one non-blank value of a header, else None (DSF: 400 when absent, blank or
    repeated; ``getHeaderValueOrThrowBadRequest``)."""
    values = request.headers.getlist(name)
    if len(values) != 1 or not values[0].strip():
        return None
    return values[0]


def create_app(service: FhirService, hub: SubscriptionHub) -> Starlette:
    """The ASGI app: FHIR REST under ``/fhir``, the websocket at ``/fhir/ws``."""

    def identify(scope: Scope) -> OrganizationIdentity | FhirResponse:
        certificate = _scope_certificate(scope)
        if certificate is None:
            return service.identify(None)
        return service.identify(thumbprint(certificate), certificate_email(certificate))

    async def rest(request: Request) -> Response:
        prefer = request.headers.get("prefer", "")
        accept = request.headers.get("accept", "")
        identity = identify(request.scope)
        if isinstance(identity, FhirResponse):
            return _render(service, identity, "", accept)
        path = request.path_params.get("path", "")
        parts = [p for p in path.strip("/").split("/") if p]
        if path == "metadata" and request.method == "GET":
            return _render(service, FhirResponse(200, _capability_statement(service)), "", accept)
        method = request.method
        # DSF 2.x answers HEAD on a Binary (readHead, vreadHead); 1.9 has no HEAD.
        head = (
            method == "HEAD"
            and service.release.major >= 2
            and parts[:1] == ["Binary"]
            and len(parts) in (2, 4)
        )
        if head:
            method = "GET"
        body: dict[str, Any] | None = None
        content: BinaryContent | None = None
        if method in ("POST", "PUT"):
            content_type = request.headers.get("content-type", FHIR_JSON).split(";")[0].strip()
            raw_target = parts == ["Binary"] if method == "POST" else len(parts) == 2
            if (
                parts[:1] == ["Binary"]
                and raw_target
                and content_type.lower() not in _FHIR_BODY_TYPES
            ):
                # A raw upload (BinaryServiceJaxrs.create(InputStream ...)): the content type
                # and X-Security-Context headers make the resource; DSF answers a missing,
                # blank or repeated one with a bare 400 before it reads the body.
                security_context = _header_once(request, "x-security-context")
                raw_content_type = _header_once(request, "content-type")
                if security_context is None or raw_content_type is None:
                    _log.warning("binary.upload_refused", reason="X-Security-Context header")
                    return Response(status_code=400)
                # The header as sent, parameters included, as DSF's createBinary takes it.
                body = binary_resource(raw_content_type, security_context)
                if method == "PUT" and len(parts) == 2:
                    body["id"] = parts[1]
                elif method == "POST":
                    denied = service.upload_denied(identity, body)
                    if denied is not None:
                        return _render(service, denied, "", accept)
                content = await service.binaries.receive(request.stream())
            else:
                raw = await request.body()
                if "xml" in content_type:
                    return _render(
                        service,
                        FhirResponse(
                            415,
                            operation_outcome(
                                "the sandbox accepts application/fhir+json only",
                                code="not-supported",
                            ),
                        ),
                        "",
                        accept,
                    )
                try:
                    parsed = json.loads(raw) if raw else None
                except (ValueError, RecursionError) as exc:
                    # Python's parser gives up on deep nesting where Jackson does too (1,000).
                    return _render(
                        service, unparsable(f"not JSON: {type(exc).__name__}"), "", accept
                    )
                if parsed is not None and not isinstance(parsed, dict):
                    return _render(service, unparsable("the body is no JSON object"), "", accept)
                body = parsed
        headers = {k.lower(): v for k, v in request.headers.items()}
        params = list(request.query_params.multi_items())
        response = service.handle(
            identity, method, path, params, headers=headers, body=body, content=content
        )
        if (
            method == "GET"
            and parts[:1] == ["Binary"]
            and len(parts) in (2, 4)
            and response.status == 200
        ):
            return _render_binary(service, response, request, head=head)
        # Prefer concerns creates and updates; for Bundles it applies to the entries, which the
        # service already honoured.
        writes = method in ("POST", "PUT") and path.strip("/")
        return _render(service, response, prefer if writes else "", accept)

    async def websocket(ws: WebSocket) -> None:
        identity = identify(ws.scope)
        await ws.accept()
        # DSF grants the websocket role to the local organization only (FhirServerRoleImpl:
        # remote organizations may create Tasks and read, search and see history), and to
        # practitioners whose role config says WEBSOCKET.
        if (
            isinstance(identity, FhirResponse)
            or not identity.local
            or (
                isinstance(identity, PractitionerIdentity)
                and not identity.allows("WEBSOCKET", "Subscription")
            )
        ):
            await ws.close(code=CLOSE_VIOLATED_POLICY, reason="Forbidden")
            return
        queue: asyncio.Queue[str] = asyncio.Queue()

        async def forward() -> None:
            while True:
                await ws.send_text(await queue.get())

        sender = asyncio.create_task(forward())
        try:
            while True:
                message = await ws.receive_text()
                if not message.startswith("bind "):
                    continue
                subscription_id = message[len("bind ") :].strip()
                if hub.subscription(subscription_id) is None:
                    _log.warning("websocket.bind_refused", subscription_id=subscription_id)
                    await ws.close(
                        code=CLOSE_CANNOT_ACCEPT,
                        reason=f"Subscription with {subscription_id} not found",
                    )
                    return
                hub.bind(subscription_id, identity, queue)
                queue.put_nowait(f"bound {subscription_id}")
                _log.info("websocket.bound", subscription_id=subscription_id)
        except WebSocketDisconnect:
            pass
        finally:
            hub.unbind(queue)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
    return Starlette(
        routes=[
            WebSocketRoute("/fhir/ws", websocket),
            Route("/fhir", rest, methods=methods),
            Route("/fhir/", rest, methods=methods),
            Route("/fhir/{path:path}", rest, methods=methods),
        ]
    )


def _capability_statement(service: FhirService) -> dict[str, Any]:
    # A bridge learns the DSF version from software.version, as it would from a real server.
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON],
        "software": {
            "name": "Data Sharing Framework",
            # As DSF writes it: project version (branch/commit).
            "version": f"{service.release.software_version} (sandbox/0000000)",
        },
    }


def server_ssl_context(certificate: Path, key: Path, ca_files: Sequence[Path]) -> ssl.SSLContext:
    """Server side TLS: TLS 1.2+, client certificates required and checked against ``ca_files``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certificate), str(key))
    for ca_file in ca_files:
        context.load_verify_locations(cafile=str(ca_file))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class SandboxServer:
    """Serve one organization's sandbox on ``https://127.0.0.1:<port>/fhir`` while in use.

    ``async with SandboxServer(...) as server:`` binds (port 0 picks a free port), starts
    uvicorn in this event loop and stops it on exit.
    """

    def __init__(
        self,
        service: FhirService,
        *,
        certificate: Path,
        key: Path,
        ca_files: Sequence[Path],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.service = service
        self.hub = SubscriptionHub(service)
        self._host = host
        context = server_ssl_context(certificate, key, ca_files)
        self._uvicorn = EmbeddedUvicorn(
            create_app(service, self.hub),
            host=host,
            port=port,
            ssl_context_factory=lambda _config, _default: context,
            http=_PeerCertificateH11Protocol,
            ws=_PeerCertificateWebSocketProtocol,
            # DSF's ServerEndpoint: a ping frame every 28 s, and no close on a missing pong.
            ws_ping_interval=28.0,
            ws_ping_timeout=None,
            # Idle keep-alive connections live 30 s, as with Jetty's default idle timeout
            # behind DSF (uvicorn's 5 s closes connections clients are about to reuse).
            timeout_keep_alive=30,
            timeout_graceful_shutdown=1,
        )
        self.port = port

    @property
    def base_url(self) -> str:
        return f"https://{self._host}:{self.port}/fhir"

    async def __aenter__(self) -> SandboxServer:
        await self._uvicorn.start()
        # Nobody knows the port before start() returns, so no request sees the old base URL.
        self.port = self._uvicorn.port
        self.service.set_base_url(self.base_url)
        _log.info(
            "sandbox.started", url=self.base_url, organization=self.service.local_organization
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        await self._uvicorn.stop()

    async def wait(self) -> None:
        """Run until the task serving is cancelled (the CLI's ``serve``)."""
        await self._uvicorn.wait()
