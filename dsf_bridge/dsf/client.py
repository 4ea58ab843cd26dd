"""The FHIR REST client for DSF FHIR servers (the local one and remote ones), over httpx.

JSON on the wire (``application/fhir+json``). Errors become :class:`~dsf_bridge.errors.RemoteError`
with the HTTP status and the server's OperationOutcome diagnostics (JSON or XML, the latter
parsed with entities, DTDs and network access off). Retries are bounded with exponential
back-off, for HTTP 5xx, 429 (honouring ``Retry-After`` up to a cap) and connection failures only;
4xx answers are never retried. A request that may have reached the server (the connection broke
after sending), or that the server may have processed (a 5xx other than 503), is retried only
when repeating it is harmless: GET, PUT, DELETE, and POST with ``If-None-Exist``. A plain POST
would risk a second Task, so that failure is reported retryable for the runtime to decide with
its outbox, which looks for the earlier delivery first. TLS failures are not retried and say
which side refused whom.

``proxy`` routes the calls through the site's forward proxy (``[proxy]``) unless the base URL's
host bypasses it; an https server is then reached through a CONNECT tunnel, with TLS and the
client certificate end to end. The proxy environment (``HTTPS_PROXY``) is not read.

Tests inject an ``httpx`` transport (``httpx.MockTransport``) through ``transport=``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from lxml import etree

from dsf_bridge.dsf import pool
from dsf_bridge.dsf.vocabulary import FHIR_JSON, outcome_diagnostics
from dsf_bridge.errors import RemoteError
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.retry import CALL_RETRY, RetryPolicy

__all__ = ["BinaryTooLargeError", "FhirClient", "FhirResult", "RetryPolicy", "parse_outcome"]

_log = structlog.get_logger()

_FHIR_NS = "{http://hl7.org/fhir}"
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
# Raised before a request was sent: always safe to repeat.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# An error answer is read this far for its OperationOutcome, never further.
_ERROR_BODY_LIMIT = 64 * 1024


class BinaryTooLargeError(RemoteError):
    """A Binary's content exceeds the size the caller allows (``max_bytes``): the download
    stopped there, or did not start when ``Content-Length`` said so. Never retryable: the
    same Binary stays too large. A bound on every download is the guard against unbounded
    memory (DSF advisory GHSA-xfv4-vhh2-m2j8)."""

    def __init__(self, message: str, *, limit: int, status: int | None = None) -> None:
        super().__init__(message, retryable=False, status=status)
        self.limit = limit


async def _read_bounded(response: httpx.Response) -> bytes:
    """An error answer's body, at most ``_ERROR_BODY_LIMIT`` bytes of it; closes the response."""
    body = b""
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= _ERROR_BODY_LIMIT:
                break
    finally:
        await response.aclose()
    return body[:_ERROR_BODY_LIMIT]


@dataclass(frozen=True)
class FhirResult:
    """The answer to a create or update: status, headers of interest and the body if any."""

    status: int
    resource: dict[str, Any] | None
    location: str | None
    etag: str | None
    last_modified: str | None

    @property
    def id(self) -> str | None:
        """The resource id, from the body or else from ``Location`` (``.../Type/id/_history/n``)."""
        if self.resource is not None and self.resource.get("id"):
            return str(self.resource["id"])
        parts = _location_parts(self.location)
        return parts[1] if parts else None

    @property
    def version(self) -> int | None:
        if self.etag:
            text = self.etag.removeprefix("W/").strip('"')
            if text.isdigit():
                return int(text)
        parts = _location_parts(self.location)
        return int(parts[2]) if parts and parts[2].isdigit() else None


def _location_parts(location: str | None) -> tuple[str, str, str] | None:
    if not location:
        return None
    path = urlsplit(location).path.rstrip("/").split("/")
    if len(path) >= 4 and path[-2] == "_history":
        return path[-4], path[-3], path[-1]
    if len(path) >= 2:
        return path[-2], path[-1], ""
    return None


def parse_outcome(content: bytes, content_type: str) -> str:
    """The diagnostics of an OperationOutcome body in JSON or XML; empty if there is none."""
    if not content:
        return ""
    if "xml" in content_type or content.lstrip().startswith(b"<"):
        parser = etree.XMLParser(
            resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
        )
        try:
            root = etree.fromstring(content, parser=parser)
        except etree.XMLSyntaxError:
            return ""
        if root.tag != f"{_FHIR_NS}OperationOutcome":
            return ""
        texts: list[str] = []
        for issue in root.findall(f"{_FHIR_NS}issue"):
            element = issue.find(f"{_FHIR_NS}diagnostics")
            if element is None:
                element = issue.find(f"{_FHIR_NS}details/{_FHIR_NS}text")
            if element is not None and element.get("value"):
                texts.append(str(element.get("value")))
        return "; ".join(texts)
    try:
        parsed = json.loads(content)
    except ValueError:
        return ""
    if isinstance(parsed, dict) and parsed.get("resourceType") == "OperationOutcome":
        return outcome_diagnostics(parsed)
    return ""


# Bodies DSF's BinaryServiceJaxrs parses as a FHIR resource, not as Binary content.
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


def _idempotent_batch(bundle: Mapping[str, Any]) -> bool:
    """Whether repeating this batch or transaction is harmless: every entry reads, updates,
    deletes, or creates only if none exists (``request.ifNoneExist``; the plugin resources a
    bridge publishes at start-up)."""
    for entry in bundle.get("entry") or []:
        request = entry.get("request") if isinstance(entry, Mapping) else None
        if not isinstance(request, Mapping):
            return False
        method = str(request.get("method") or "").upper()
        if method == "POST" and not request.get("ifNoneExist"):
            return False
        if method not in ("GET", "HEAD", "PUT", "DELETE", "POST"):
            return False
    return True


# Answers that say the server did not process the request: a plain POST may be repeated.
_NOT_PROCESSED = frozenset({429, 503})


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _describe_tls(error: ssl.SSLError, url: str) -> str:
    text = str(error)
    host = urlsplit(url).hostname
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"TLS: the certificate of {host} is not trusted ({error.verify_message}); check "
            "dsf.ca_certificates and that the URL's host name is in the server certificate"
        )
    if "ALERT" in text.upper():
        # An alert comes from the peer: the server refused the certificate we presented.
        return (
            f"TLS: {host} rejected our client certificate ({text}); check that it is issued "
            "by a CA the server trusts, not expired, and configured at all"
        )
    return f"TLS handshake with {host} failed: {text}"


def _reset_by_peer(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConnectionResetError | BrokenPipeError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


# Connections a client keeps to its server at most (see FhirClient), and for Binary content.
CONNECTIONS = 20
_BULK_CONNECTIONS = 100


class FhirClient:
    """Async FHIR REST client for one FHIR base URL.

    It keeps at most ``connections`` connections to the server, all of them alive between
    requests (until the server or the 5 s keep-alive expiry closes them); a request beyond them
    waits for one, within ``timeout``. Binary content (:meth:`upload_binary`,
    :meth:`download_binary`) goes over connections of its own, up to 100, so that long
    transfers never hold up the Tasks. A given ``transport`` serves both.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        proxy: ForwardProxy | None = None,
        connections: int = CONNECTIONS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._retry = retry or CALL_RETRY
        self._sleep = sleep
        # The proxy this server is reached through (None: directly); the websocket follows it.
        self.proxy = proxy.route(self.base_url) if proxy is not None else None
        self.connections = connections
        self._timeout = timeout
        if transport is not None:
            self._http = self._bulk = self._client(transport)
            return
        # Every connection is kept alive: httpx's default (100, of which 20 kept) closes each
        # connection above 20 as soon as it is idle, and the next request pays a new mutual-TLS
        # handshake on both sides. More requests at once wait for one.
        self._http = self._client(
            self._transport(
                ssl_context,
                httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            )
        )
        # Binary content, up and down, on connections of its own (httpx's default pool): a
        # transfer holds its connection for minutes, and must not hold up Tasks.
        self._bulk = self._client(
            self._transport(ssl_context, httpx.Limits(max_connections=_BULK_CONNECTIONS))
        )

    def _transport(
        self, ssl_context: ssl.SSLContext | None, limits: httpx.Limits
    ) -> httpx.AsyncHTTPTransport:
        # TCP_NODELAY: a request goes out as headers and body; without it Nagle's algorithm
        # and the peer's delayed ACK add ~40 ms to every POST and PUT.
        # pool.install: the pool's check of idle connections, before every request, costs a
        # poll instead of a walk through anyio's TLS attributes (dsf_bridge.dsf.pool).
        return pool.install(
            httpx.AsyncHTTPTransport(
                verify=ssl_context if ssl_context is not None else True,
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                proxy=httpx.Proxy(self.proxy.url, auth=self.proxy.auth) if self.proxy else None,
                limits=limits,
            )
        )

    def _client(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=transport,  # given a transport, httpx reads no proxy from the environment
            timeout=self._timeout,
            headers={"Accept": FHIR_JSON},
            follow_redirects=False,
        )

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._bulk is not self._http:
            await self._bulk.aclose()

    # -- interactions ---------------------------------------------------------------------------

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        response = await self.request("GET", f"{resource_type}/{resource_id}")
        return self._json(response)

    async def search_pages(
        self,
        resource_type: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        strict: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every searchset Bundle, following ``next`` links on this server until there is none.

        ``strict``: ``Prefer: handling=strict``, so that the server refuses a parameter it does
        not know instead of ignoring it (DSF's ``searchWithStrictHandling``)."""
        url: str | None = resource_type
        query: Mapping[str, str] | Sequence[tuple[str, str]] | None = params
        headers = {"Prefer": "handling=strict"} if strict else None
        while url is not None:
            response = await self.request("GET", url, params=query, headers=headers)
            bundle = self._json(response)
            if bundle.get("resourceType") != "Bundle":
                raise RemoteError(
                    f"search {resource_type} answered {bundle.get('resourceType')}, not a Bundle",
                    status=response.status_code,
                )
            yield bundle
            url = next(
                (
                    str(link.get("url"))
                    for link in bundle.get("link") or []
                    if link.get("relation") == "next" and link.get("url")
                ),
                None,
            )
            query = None
            if url is not None:
                self._check_same_server(url)

    async def search(
        self,
        resource_type: str,
        params: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        include_mode: bool = False,
        strict: bool = False,
    ) -> list[dict[str, Any]]:
        """All matching resources over all pages; with ``include_mode`` also ``_include``d ones
        (``strict``: as for :meth:`search_pages`)."""
        found: list[dict[str, Any]] = []
        async for bundle in self.search_pages(resource_type, params, strict=strict):
            for entry in bundle.get("entry") or []:
                mode = (entry.get("search") or {}).get("mode", "match")
                resource = entry.get("resource")
                if not isinstance(resource, dict):
                    continue
                if mode == "match" or (include_mode and mode == "include"):
                    found.append(resource)
        return found

    async def create(
        self,
        resource: Mapping[str, Any],
        *,
        if_none_exist: str | None = None,
        return_minimal: bool = False,
    ) -> FhirResult:
        """POST a resource; ``if_none_exist`` makes it a conditional create (DSF answers 200 with
        the existing resource when one matches)."""
        headers = {"Prefer": "return=minimal" if return_minimal else "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = if_none_exist
        response = await self.request(
            "POST", str(resource["resourceType"]), json_body=resource, headers=headers
        )
        return self._result(response)

    async def update(
        self,
        resource: Mapping[str, Any],
        *,
        if_match: int | str | None = None,
        return_minimal: bool = False,
    ) -> FhirResult:
        """PUT a resource; ``if_match`` is a version number or an ETag (``W/"3"``)."""
        headers = {"Prefer": "return=minimal" if return_minimal else "return=representation"}
        if if_match is not None:
            headers["If-Match"] = f'W/"{if_match}"' if isinstance(if_match, int) else if_match
        path = f"{resource['resourceType']}/{resource['id']}"
        response = await self.request("PUT", path, json_body=resource, headers=headers)
        return self._result(response)

    async def bundle(
        self, bundle: Mapping[str, Any], *, return_minimal: bool = False
    ) -> dict[str, Any]:
        """POST a batch or transaction Bundle to the base URL; the response Bundle."""
        if bundle.get("type") not in ("batch", "transaction"):
            raise ValueError("Bundle.type must be batch or transaction")
        headers = {"Prefer": "return=minimal" if return_minimal else "return=representation"}
        response = await self.request(
            "POST", "", json_body=bundle, headers=headers, repeatable=_idempotent_batch(bundle)
        )
        return self._json(response)

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """DELETE a resource; one that is not there (404) or deleted already (410) is gone
        as wanted, not an error (a repeated clean-up after a crash)."""
        try:
            await self.request("DELETE", f"{resource_type}/{resource_id}")
        except RemoteError as exc:
            if exc.status in (404, 410):
                _log.info(
                    "fhir_resource.already_gone",
                    resource_type=resource_type,
                    resource_id=resource_id,
                    status=exc.status,
                )
                return
            raise

    # -- Binary content -------------------------------------------------------------------------

    async def upload_binary(
        self,
        content: AsyncIterable[bytes] | Callable[[], AsyncIterable[bytes]],
        *,
        content_type: str,
        security_context: str,
    ) -> FhirResult:
        """POST raw content as a Binary, streamed, never whole in memory.

        DSF builds the Binary from the body, ``Content-Type`` and ``X-Security-Context``
        (``BinaryServiceJaxrs``): it is readable by exactly who may read the
        ``security_context`` resource (a literal ``Type/id`` on this server; DSF refuses a
        Task or Binary there, and a missing header with 400). The answer is asked for as
        ``return=minimal``: DSF would otherwise send the whole content back as base64.

        ``content``: an async iterable of chunks, or a factory making a fresh one per
        attempt. A streamed body cannot be sent twice, so only a factory is retried (after a
        dropped connection or a 5xx/429; a repeat after the server stored the first upload
        leaves an orphan Binary with the same security context, which the caller's retention
        clean-up deletes). Without a factory a failure is raised as it comes."""
        if content_type.split(";", maxsplit=1)[0].strip().lower() in _FHIR_BODY_TYPES:
            raise ValueError(
                f"content type {content_type} would make DSF parse the body as a FHIR resource; "
                "upload raw content as application/octet-stream or its own media type"
            )
        factory: Callable[[], AsyncIterable[bytes]]
        if callable(content):
            factory = content
            repeatable = True
        else:
            used = False
            stream = content

            def factory() -> AsyncIterable[bytes]:
                nonlocal used
                if used:  # pragma: no cover - guarded by repeatable=False
                    raise RuntimeError("a streamed body cannot be sent twice")
                used = True
                return stream

            repeatable = False
        headers = {
            "Content-Type": content_type,
            "X-Security-Context": security_context,
            "Prefer": "return=minimal",
        }
        response = await self._send(
            "POST",
            "Binary",
            content=factory,
            headers=headers,
            repeatable=repeatable,
            # A plain POST is never repeated on a dropped connection; with a factory it is.
            retry_unsent_only=not repeatable,
            bulk=True,
        )
        return self._result(response)

    async def download_binary(
        self,
        url: str,
        sink: Callable[[bytes], Awaitable[None] | None],
        *,
        max_bytes: int,
        accept: str = "application/octet-stream",
    ) -> int:
        """GET a Binary's raw content, handing it chunk by chunk to ``sink``; the byte count.

        ``url``: an absolute URL on this client's server or a ``Binary/<id>`` reference
        (``Binary/<id>/_history/<n>`` for one version); other servers are refused, as for
        paging links. ``accept``: the Binary's media type or a wildcard; DSF answers 406 when
        it is not compatible with the stored content type, and a FHIR media type would get
        the resource instead of the content. More than ``max_bytes`` raises
        :class:`BinaryTooLargeError` (from ``Content-Length`` before reading, else once the
        limit is crossed); bytes already handed to ``sink`` stay there, the caller discards
        them. A connection lost before the first byte is retried; after it, the error is
        retryable for the caller (the sink holds a partial content)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        if "://" in url:
            self._check_same_server(url)
        elif not url.startswith("Binary/"):
            raise ValueError(f"{url!r} is neither an absolute URL nor a Binary/<id> reference")
        # identity: the limit counts the bytes that arrive; a compressed body could expand far
        # beyond it within one chunk.
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        response = await self._send(
            "GET", url, content=lambda: None, headers=headers, stream=True, bulk=True
        )
        target = str(response.request.url)
        received = 0
        try:
            if response.headers.get("content-encoding", "identity") != "identity":
                raise RemoteError(
                    f"GET {target}: the server compressed the Binary "
                    f"({response.headers['content-encoding']}) though asked not to; refusing it"
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise BinaryTooLargeError(
                    f"GET {target}: the Binary has {int(declared)} bytes, more than the limit "
                    f"of {max_bytes} bytes; nothing was read (raise the limit if the content "
                    "is expected to be this large)",
                    limit=max_bytes,
                    status=response.status_code,
                )
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if received > max_bytes:
                    raise BinaryTooLargeError(
                        f"GET {target}: the Binary exceeds the limit of {max_bytes} bytes; the "
                        "download was aborted (raise the limit if the content is expected to "
                        "be this large)",
                        limit=max_bytes,
                        status=response.status_code,
                    )
                result = sink(chunk)
                if inspect.isawaitable(result):
                    await result
        except httpx.TransportError as exc:
            raise RemoteError(
                f"GET {target}: connection lost after {received} bytes "
                f"({type(exc).__name__}: {exc})",
                retryable=True,
            ) from exc
        finally:
            await response.aclose()
        _log.info("binary.downloaded", bytes=received)
        return received

    # -- transport ------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        json_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        repeatable: bool = False,
    ) -> httpx.Response:
        """One request with the retry policy; a non-2xx answer raises :class:`RemoteError`.

        ``repeatable``: repeating this POST is harmless (a batch of conditional creates), so
        it is retried like a GET or PUT."""
        all_headers = dict(headers or {})
        body: bytes | None = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers["Content-Type"] = FHIR_JSON
        return await self._send(
            method,
            path_or_url,
            params=params,
            content=lambda: body,
            headers=all_headers,
            repeatable=repeatable,
        )

    async def _send(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        content: Callable[[], bytes | AsyncIterable[bytes] | None],
        headers: Mapping[str, str],
        repeatable: bool = False,
        stream: bool = False,
        retry_unsent_only: bool = False,
        bulk: bool = False,
    ) -> httpx.Response:
        """:meth:`request` with the body from ``content`` (called once per attempt: a streamed
        body cannot be sent twice). ``stream``: the answer's body is left unread (the caller
        reads and closes it); error answers are read (bounded) and raised as usual.
        ``retry_unsent_only``: not even a connection error is retried (the body is gone).
        ``bulk``: over the connections for Binary content."""
        client = self._bulk if bulk else self._http
        url = path_or_url if "://" in path_or_url else f"{self.base_url}/{path_or_url}".rstrip("/")
        all_headers = dict(headers)
        query: list[tuple[str, str | int | float | bool | None]] | None = None
        if params is not None:
            query = list(params.items()) if isinstance(params, Mapping) else list(params)
        repeatable = repeatable or method in _IDEMPOTENT or "If-None-Exist" in all_headers
        attempt = 0
        while True:
            attempt += 1
            try:
                request = client.build_request(
                    method, url, params=query, content=content(), headers=all_headers
                )
                response = await client.send(request, stream=stream)
            except httpx.TransportError as exc:
                tls = _tls_cause(exc)
                if tls is not None:
                    raise RemoteError(f"{method} {url}: {_describe_tls(tls, url)}") from exc
                may_repeat = (isinstance(exc, _NOT_SENT) and not retry_unsent_only) or repeatable
                text = f"{method} {url}: connection failed ({type(exc).__name__}: {exc})"
                if isinstance(exc, httpx.PoolTimeout):
                    text = (
                        f"{method} {url}: no free connection to the server within "
                        f"{self._timeout:g} s "
                        f"(all {_BULK_CONNECTIONS if bulk else self.connections} busy)"
                    )
                if url.startswith("https://") and _reset_by_peer(exc):
                    # Python's asyncio TLS servers drop the connection without sending the alert
                    # when they refuse a client certificate; a reset is all the client sees.
                    text = (
                        f"{method} {url}: {urlsplit(url).hostname} reset the connection during "
                        "or right after the TLS handshake; it probably refused our client "
                        "certificate (not issued by a CA it trusts, expired, or none presented): "
                        "check dsf.client_certificate"
                    )
                if may_repeat and attempt < self._retry.attempts:
                    delay = self._retry.delay(attempt)
                    _log.warning(
                        "fhir_request.retried",
                        method=method,
                        url=url,
                        attempt=attempt,
                        error=type(exc).__name__,
                        delay=delay,
                    )
                    await self._sleep(delay)
                    continue
                raise RemoteError(text, retryable=True) from exc
            if response.is_success:
                return response
            error_body = await _read_bounded(response) if stream else response.content
            retryable = response.status_code >= 500 or response.status_code == 429
            # A plain POST answered 500, 502 or 504 may have been processed (a proxy that lost
            # the backend's answer): repeating it here could make a second Task. Only 429 and
            # 503 say "not processed"; the rest goes to the runtime, whose outbox first looks
            # for the earlier delivery.
            again = repeatable or (response.status_code in _NOT_PROCESSED and not retry_unsent_only)
            if retryable and again and attempt < self._retry.attempts:
                delay = self._retry.delay_for_answer(attempt, response.headers.get("retry-after"))
                _log.warning(
                    "fhir_request.retried",
                    method=method,
                    url=url,
                    attempt=attempt,
                    status=response.status_code,
                    delay=delay,
                )
                await self._sleep(delay)
                continue
            diagnostics = parse_outcome(error_body, response.headers.get("content-type", ""))
            message = f"{method} {url} failed with HTTP {response.status_code}"
            if diagnostics:
                message += f": {diagnostics}"
            elif response.status_code == 401:
                # DSF's Jetty answers an unknown certificate with a bare 401 error page.
                message += (
                    ": the server does not know our client certificate; is its thumbprint in "
                    "the allow list of the server's organization network?"
                )
            _log.warning("fhir_request.failed", method=method, url=url, status=response.status_code)
            raise RemoteError(message, retryable=retryable, status=response.status_code)

    def _check_same_server(self, url: str) -> None:
        ours, theirs = urlsplit(self.base_url), urlsplit(url)
        if (ours.scheme, ours.netloc) != (theirs.scheme, theirs.netloc):
            raise RemoteError(
                f"paging link {url} leaves the server {self.base_url}; refusing to follow it"
            )

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            parsed = response.json()
        except ValueError as exc:
            raise RemoteError(
                f"{response.request.method} {response.request.url} answered no JSON "
                f"(content type {response.headers.get('content-type', '?')})",
                status=response.status_code,
            ) from exc
        except RecursionError as exc:  # nesting deeper than the parser's recursion
            raise RemoteError(
                f"{response.request.method} {response.request.url} answered JSON nested too "
                "deeply to read",
                status=response.status_code,
            ) from exc
        if not isinstance(parsed, dict):
            raise RemoteError("answer is no FHIR resource", status=response.status_code)
        return parsed

    def _result(self, response: httpx.Response) -> FhirResult:
        resource = self._json(response) if response.content else None
        if resource is not None and resource.get("resourceType") == "OperationOutcome":
            resource = None
        return FhirResult(
            status=response.status_code,
            resource=resource,
            location=response.headers.get("location"),
            etag=response.headers.get("etag"),
            last_modified=response.headers.get("last-modified"),
        )
