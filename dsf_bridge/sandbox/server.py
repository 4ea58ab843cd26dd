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
import base64
import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, cast

import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from dsf_bridge.api.server import EmbeddedUvicorn
from dsf_bridge.dsf.identity import thumbprint
from dsf_bridge.dsf.vocabulary import FHIR_JSON, operation_outcome
from dsf_bridge.sandbox.authorization import OrganizationIdentity, PractitionerIdentity
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


def _render(response: FhirResponse, prefer: str, accept: str) -> Response:
    headers = dict(response.headers)
    body: dict[str, Any] | None = response.resource
    if response.status < 400 and body is not None:
        if "return=minimal" in prefer:
            body = None
        elif "return=OperationOutcome" in prefer:
            body = operation_outcome("ok", severity="information", code="informational")
        elif (
            body.get("resourceType") == "Binary"
            and accept
            and "json" not in accept
            and "xml" not in accept
            and "*/*" not in accept
        ):
            return Response(
                base64.b64decode(body.get("data", "")),
                status_code=response.status,
                headers=headers,
                media_type=str(body.get("contentType", "application/octet-stream")),
            )
    if body is None:
        return Response(status_code=response.status, headers=headers)
    return Response(
        json.dumps(body),
        status_code=response.status,
        headers=headers,
        media_type=f"{FHIR_JSON};charset=UTF-8",
    )


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
            return _render(identity, "", accept)
        path = request.path_params.get("path", "")
        if path == "metadata" and request.method == "GET":
            return _render(FhirResponse(200, _capability_statement(service)), "", accept)
        body: dict[str, Any] | None = None
        if request.method in ("POST", "PUT"):
            raw = await request.body()
            content_type = request.headers.get("content-type", FHIR_JSON).split(";")[0].strip()
            if path.split("/")[0] == "Binary" and "json" not in content_type:
                body = binary_resource(raw, content_type)
            elif "xml" in content_type:
                return _render(
                    FhirResponse(
                        415,
                        operation_outcome(
                            "the sandbox accepts application/fhir+json only", code="not-supported"
                        ),
                    ),
                    "",
                    accept,
                )
            else:
                try:
                    parsed = json.loads(raw) if raw else None
                except (ValueError, RecursionError) as exc:
                    # Python's parser gives up on deep nesting where Jackson does too (1,000).
                    return _render(unparsable(f"not JSON: {type(exc).__name__}"), "", accept)
                if parsed is not None and not isinstance(parsed, dict):
                    return _render(unparsable("the body is no JSON object"), "", accept)
                body = parsed
        headers = {k.lower(): v for k, v in request.headers.items()}
        params = list(request.query_params.multi_items())
        response = service.handle(
            identity, request.method, path, params, headers=headers, body=body
        )
        # Prefer concerns creates and updates; for Bundles it applies to the entries, which the
        # service already honoured.
        writes = request.method in ("POST", "PUT") and path.strip("/")
        return _render(response, prefer if writes else "", accept)

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

    methods = ["GET", "POST", "PUT", "DELETE"]
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
