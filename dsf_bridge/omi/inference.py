"""The Open Inference Protocol v2 client (KServe v2 REST), as MLServer, Triton and KServe speak it.

Owns the four calls the bridge needs (server readiness, model metadata, model readiness,
inference), the typed tensors that travel in them, and the translation of every failure into
the error tree::

    RemoteError                       (dsf_bridge.errors)
    └── InferenceError                the inference server failed; retryable for 5xx, 429,
        │                             timeouts and connection errors, not for other 4xx
        ├── ModelNotFoundError        the server does not know the model (404)
        └── ModelNotReadyError        the model exists but is not ready yet (retryable)

Every call is repeated within a :class:`~dsf_bridge.retry.RetryPolicy` (the policy object the
FHIR client and DICOMweb use: ``[runtime] call_*``, by default four attempts over 7 s,
:data:`~dsf_bridge.retry.CALL_RETRY`) when the server
cannot be reached, honouring ``Retry-After`` up to the policy's cap, so a model server that
restarts for a few seconds does not fail the inference. The metadata and readiness GETs are
also repeated on a connection lost mid-call and on 502, 503, 504 and 429. The inference POST
is repeated only when it cannot have been processed (the connection was refused, or the
answer is 429 or 503): OIP v2 has no idempotency key, so a POST lost mid-call or answered
502/504 by a gateway may still be computing, and a second copy would run the model twice. A
500 (the model itself failed) and a read timeout are not repeated. 4xx answers are never
repeated. Readiness calls take 503 as the verdict "not ready", not as a failure.

Tensors travel in one of two encodings, chosen per client (``tensor_encoding``):

- ``json``: every value as a JSON number (BYTES as UTF-8 text), which every OIP v2 server
  takes (MLServer's REST endpoint takes nothing else);
- ``binary``: the protocol's binary tensor data extension: the JSON header without ``data``,
  ``parameters.binary_data_size`` per input, header ``Inference-Header-Content-Length`` giving
  the header's length, then each input's raw little-endian bytes in input order (BOOL one byte
  per value, BYTES each element as a 4-byte little-endian length and its bytes); outputs are
  asked for as binary (``binary_data_output`` and per-output ``binary_data``) and a binary
  answer is decoded the same way (KServe's Python server, Triton);
- ``auto`` (the default of a catalogue service, ``[[omi.catalogue]] tensor_encoding``): asks
  the server once (``GET /v2``): a server that lists the ``binary_tensor_data`` extension
  (Triton) gets binary; one that does not is known by the name it gives (``kserve``: binary,
  ``mlserver``: JSON, both checked against the versions our tests pin). Any other server is
  tried binary: an answer 400, 415, 422 or 500 (MLServer 1.7.1 answers a binary body with a
  plain 500) is repeated at once as JSON, and the first success in either encoding decides for
  the client's life.

A request's tensors are bounded by ``max_request_bytes`` (raw tensor bytes, checked before
anything is sent: :class:`TensorLimitError`) and its answer by ``max_response_bytes`` (read
as a stream and abandoned past the limit).

Payloads are never logged: tensors hold image data.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, get_args
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt
import structlog

from dsf_bridge.errors import RemoteError
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.retry import CALL_RETRY, RetryPolicy
from dsf_bridge.telemetry import INFERENCE_SECONDS, timed

__all__ = [
    "BYTES",
    "DATATYPES",
    "HttpInferenceClient",
    "InferenceError",
    "InferenceResult",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "Tensor",
    "TensorEncoding",
    "TensorLimitError",
    "TensorSpec",
    "decode_binary_response",
    "encode_binary_request",
    "encode_json_request",
]

_log = structlog.get_logger()

# Answers that say "the server, or a gateway in front of it, is briefly unavailable".
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Answers that say the request was not processed: the only ones an inference POST repeats on
# (a 502/504 from a gateway may come while the model still computes the first copy).
_NOT_PROCESSED = frozenset({429, 503})
# Readiness calls: 503 is a verdict (KServe's "not ready"), not a failure to repeat.
_READINESS_RETRY_STATUSES = _RETRY_STATUSES - {503}

#: How tensors travel (module docstring).
TensorEncoding = Literal["auto", "json", "binary"]
TENSOR_ENCODINGS: tuple[str, ...] = get_args(TensorEncoding)
#: The header of the binary tensor data extension: the length of the JSON part of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
# The extension's name in the server metadata (GET /v2) of servers that list it (Triton).
_BINARY_EXTENSION = "binary_tensor_data"
# Answers to a trial binary request that may mean "cannot read this" (MLServer 1.7.1 answers
# 500 "Internal Server Error" in plain text): the same request is repeated as JSON.
_BINARY_REFUSED = frozenset({400, 415, 422, 500})
# Servers that list no binary_tensor_data extension but are known by name (GET /v2 "name"),
# checked against the pinned versions of scripts/setup-*.sh: KServe's Python server reads
# binary over REST, MLServer's REST endpoint does not.
_SERVERS_BY_NAME: Mapping[str, bool] = {"kserve": True, "mlserver": False}
DEFAULT_MAX_REQUEST_BYTES = 1 << 30
DEFAULT_MAX_RESPONSE_BYTES = 256 << 20

#: The OIP v2 datatype of byte strings: a numpy object array of ``bytes`` here, strings in
#: JSON, and in binary each element as a 4-byte little-endian length and its bytes.
BYTES = "BYTES"

# OIP v2 numeric datatypes and the numpy dtypes they travel as.
DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


class InferenceError(RemoteError):
    """The inference server failed or refused; ``model`` names the model when there is one."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        status: int | None = None,
        model: str | None = None,
    ) -> None:
        # None keeps the class default (ModelNotReadyError is retryable, the others are not).
        super().__init__(message, status=status)
        self.retryable = type(self).retryable if retryable is None else retryable
        self.model = model


class TensorLimitError(InferenceError):
    """The request's tensors exceed the client's ``max_request_bytes``; nothing was sent."""


class ModelNotFoundError(InferenceError):
    """The server does not serve a model of that name (or version)."""


class ModelNotReadyError(InferenceError):
    """The model is known but not ready; it may become ready, so trying later can help."""

    retryable = True


@dataclass(frozen=True)
class Tensor:
    """A named tensor: ``datatype`` is an OIP v2 datatype, ``data`` a numpy array of that shape."""

    name: str
    datatype: str
    data: npt.NDArray[Any]

    @classmethod
    def of(cls, name: str, values: npt.ArrayLike, datatype: str) -> Tensor:
        if datatype == BYTES:
            return cls(name, datatype, _bytes_array(values))
        if datatype not in DATATYPES:
            raise ValueError(f"unsupported tensor datatype {datatype!r}")
        return cls(name, datatype, np.asarray(values, dtype=DATATYPES[datatype]))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def nbytes(self) -> int:
        """The bytes of its values as the binary extension carries them."""
        if self.datatype == BYTES:
            return sum(4 + len(value) for value in self.data.ravel())
        return int(self.data.nbytes)

    def to_json(self) -> dict[str, Any]:
        if self.datatype == BYTES:
            # JSON has no byte strings: BYTES travel as text (UTF-8), as OIP v2 servers expect.
            data: list[Any] = [bytes(value).decode("utf-8") for value in self.data.ravel()]
        else:
            data = self.data.ravel().tolist()
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": list(self.shape),
            "data": data,
        }


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as model metadata declares it; -1 in ``shape`` is a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class InferenceResult:
    """The outputs of one inference by name; null values (NaN in MLServer) come back as NaN."""

    model_name: str
    model_version: str | None
    id: str | None
    outputs: Mapping[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.outputs[name]
        except KeyError:
            raise InferenceError(
                f"model {self.model_name} returned no output {name!r}", model=self.model_name
            ) from None


class HttpInferenceClient:
    """Talks OIP v2 REST to one inference server at ``base_url``.

    ``timeout`` bounds connect and read of every call; inference on a large series may need
    more than the default, so sites set it per service. ``verify`` is an ``ssl.SSLContext``
    (mutual TLS carries the client certificate in it) or a bool. ``retry`` bounds how often a
    call is repeated after a connection failure or a 429/502/503/504 (module docstring).
    ``proxy`` is the site's forward proxy (``[proxy]``), used unless the server's host bypasses
    it (by default a server on the loopback does); the proxy environment is never read.
    ``tensor_encoding`` chooses JSON or binary tensors (module docstring); ``max_request_bytes``
    bounds the raw bytes of a request's tensors, ``max_response_bytes`` the body of an answer.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        verify: ssl.SSLContext | bool = True,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy = CALL_RETRY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        proxy: ForwardProxy | None = None,
        tensor_encoding: TensorEncoding = "json",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if tensor_encoding not in TENSOR_ENCODINGS:
            raise ValueError(f"tensor_encoding must be one of {TENSOR_ENCODINGS}")
        self.base_url = base_url.rstrip("/")
        self.tensor_encoding: TensorEncoding = tensor_encoding
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        # auto: None until the server's answer (metadata or a first binary try) decides.
        self._binary: bool | None = {"json": False, "binary": True}.get(tensor_encoding)
        self._asked = False  # auto: the server metadata was read
        self._retry = retry
        self._sleep = sleep
        route = proxy.route(self.base_url) if proxy is not None else None
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            verify=verify,
            headers=dict(headers or {}),
            transport=transport,
            proxy=httpx.Proxy(route.url, auth=route.auth) if route is not None else None,
            trust_env=False,  # the proxy is [proxy]'s, never HTTPS_PROXY's
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def server_ready(self) -> bool:
        """``/v2/health/ready``: True on 200, False on another answer; errors if unreachable."""
        response = await self._request(
            "GET", "/v2/health/ready", model=None, retry_statuses=_READINESS_RETRY_STATUSES
        )
        return response.status_code == 200

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        """``/v2/models/{name}/ready``: True on 200; unknown models raise ModelNotFoundError."""
        response = await self._request(
            "GET",
            f"{_model_path(model, version)}/ready",
            model=model,
            retry_statuses=_READINESS_RETRY_STATUSES,
        )
        # Servers answer "not ready" with 400 (MLServer, Triton) or 503 (KServe); other
        # failures are errors, not a readiness verdict.
        if response.status_code == 404 or (
            response.status_code >= 500 and response.status_code != 503
        ):
            raise _error_for(response, model, self.base_url)
        return response.status_code == 200

    async def ensure_model_ready(self, model: str, version: str | None = None) -> None:
        """Raise :class:`ModelNotReadyError` unless the model answers ready."""
        if not await self.model_ready(model, version):
            raise ModelNotReadyError(
                f"model {model} at {self.base_url} is not ready (it may still be loading)",
                status=400,
                model=model,
            )

    async def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        response = await self._request("GET", _model_path(model, version), model=model)
        if response.status_code != 200:
            raise _error_for(response, model, self.base_url)
        body = _json_object(response, model)
        return ModelMetadata(
            name=str(body.get("name", model)),
            versions=tuple(str(v) for v in body.get("versions") or ()),
            platform=str(body.get("platform") or ""),
            inputs=tuple(_tensor_spec(item) for item in body.get("inputs") or ()),
            outputs=tuple(_tensor_spec(item) for item in body.get("outputs") or ()),
        )

    @property
    def binary(self) -> bool | None:
        """Whether inferences travel as binary tensors; None while ``auto`` has not decided."""
        return self._binary

    async def server_metadata(self) -> tuple[str, frozenset[str]]:
        """The server's name and the extensions it lists (``GET /v2``); empty if it fails."""
        response = await self._request("GET", "/v2", model=None)
        try:
            body = response.json() if response.status_code == 200 else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return "", frozenset()
        listed = body.get("extensions")
        extensions = frozenset(str(e) for e in listed) if isinstance(listed, list) else frozenset()
        return str(body.get("name") or ""), extensions

    async def choose_encoding(self) -> bool | None:
        """``auto``: read the server metadata once and decide from it when it says enough
        (module docstring); :attr:`binary` after that. Called by the first inference unless
        called before (the providing site does, with the readiness check, before it fetches
        the study)."""
        if self._binary is None and not self._asked:
            self._asked = True
            await self._choose_encoding()
        return self._binary

    async def _choose_encoding(self) -> None:
        name, extensions = await self.server_metadata()
        if _BINARY_EXTENSION in extensions:
            self._decided(binary=True, reason="extension listed")
        elif name.lower() in _SERVERS_BY_NAME:
            self._decided(binary=_SERVERS_BY_NAME[name.lower()], reason=f"server {name}")

    async def infer(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        version: str | None = None,
        request_id: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferenceResult:
        """``/v2/models/{name}/infer``; the answer's tensors as numpy arrays.

        Raises :class:`TensorLimitError` before anything is sent when the tensors hold more
        than ``max_request_bytes``.
        """
        size = sum(tensor.nbytes for tensor in inputs)
        if size > self.max_request_bytes:
            raise TensorLimitError(
                f"the request's tensors hold {size} bytes, more than the limit of "
                f"{self.max_request_bytes} bytes (max_request_bytes)",
                model=model,
            )
        path = f"{_model_path(model, version)}/infer"
        with timed(INFERENCE_SECONDS):
            await self.choose_encoding()
            response: httpx.Response | None = None
            if self._binary is not False:
                content, headers = await asyncio.to_thread(
                    encode_binary_request, inputs, request_id=request_id, outputs=outputs
                )
                response = await self._request(
                    "POST", path, model=model, content=content, headers=headers, bounded=True
                )
                del content
                trial = self._binary is None
                if trial and response.status_code == 200:
                    self._decided(binary=True, reason="binary request answered")
                elif trial and response.status_code in _BINARY_REFUSED:
                    # A server that cannot read binary refuses the body: the same request as
                    # JSON; its success decides (a 4xx both ways was the request's own fault).
                    response = None
            if response is None:
                content, headers = await asyncio.to_thread(
                    encode_json_request, inputs, request_id=request_id, outputs=outputs
                )
                response = await self._request(
                    "POST", path, model=model, content=content, headers=headers, bounded=True
                )
                del content
                if self._binary is None and response.status_code == 200:
                    self._decided(binary=False, reason="binary request refused")
            if response.status_code != 200:
                raise _error_for(response, model, self.base_url)
        try:
            answer, tensors = await asyncio.to_thread(decode_binary_response, response)
        except (KeyError, TypeError, ValueError) as exc:
            raise InferenceError(
                f"model {model} at {self.base_url} answered with malformed outputs: {exc}",
                model=model,
            ) from exc
        _log.info("inference.completed", model=model, outputs=len(tensors))
        return InferenceResult(
            model_name=str(answer.get("model_name", model)),
            model_version=answer.get("model_version"),
            id=answer.get("id"),
            outputs=tensors,
        )

    def _decided(self, *, binary: bool, reason: str) -> None:
        self._binary = binary
        _log.info(
            "tensor_encoding.chosen",
            server=self.base_url,
            encoding="binary" if binary else "json",
            reason=reason,
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        model: str | None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        retry_statuses: frozenset[int] = _RETRY_STATUSES,
        bounded: bool = False,
    ) -> httpx.Response:
        """One call with the retry policy; the last answer, whatever its status. ``bounded``
        reads the answer as a stream and fails past ``max_response_bytes``."""
        attempt = 0
        while True:
            attempt += 1
            try:
                request = self._client.build_request(
                    method, path, json=json, content=content, headers=headers
                )
                if bounded:
                    response = await self._bounded_send(request, model)
                else:
                    response = await self._client.send(request)
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
                raise InferenceError(
                    f"inference server {self.base_url} did not answer {method} {path} in time",
                    retryable=True,
                    model=model,
                ) from exc
            except httpx.TransportError as exc:
                # Refused, reset, or closed before answering: the server is (re)starting. An
                # inference POST is repeated only when it never reached the server: OIP v2 has
                # no idempotency key, and a reset mid-request may mean the model is working on
                # it (or was killed by it); a second copy would run it again.
                sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if attempt < self._retry.attempts and not (sent and method != "GET"):
                    await self._wait(attempt, method, path, model, error=type(exc).__name__)
                    continue
                raise InferenceError(
                    f"inference server {self.base_url} is unreachable "
                    f"({attempt} attempts, {type(exc).__name__}): {exc}",
                    retryable=True,
                    model=model,
                ) from exc
            statuses = retry_statuses if method == "GET" else retry_statuses & _NOT_PROCESSED
            if response.status_code in statuses and attempt < self._retry.attempts:
                await self._wait(
                    attempt,
                    method,
                    path,
                    model,
                    status=response.status_code,
                    retry_after=response.headers.get("retry-after"),
                )
                continue
            return response

    async def _bounded_send(self, request: httpx.Request, model: str | None) -> httpx.Response:
        """``request``'s answer, read up to ``max_response_bytes`` (then InferenceError)."""
        limit = self.max_response_bytes
        response = await self._client.send(request, stream=True)
        try:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _too_large(model, self.base_url, limit, int(declared))
            chunks: list[bytes] = []
            received = 0
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > limit:
                    raise _too_large(model, self.base_url, limit, None)
                chunks.append(chunk)
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code,
            headers=[
                (name, value)
                for name, value in response.headers.multi_items()
                if name.lower() not in {"content-encoding", "transfer-encoding"}
            ],
            content=b"".join(chunks),
            request=request,
        )

    async def _wait(
        self,
        attempt: int,
        method: str,
        path: str,
        model: str | None,
        *,
        error: str | None = None,
        status: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        delay = self._retry.delay_for_answer(attempt, retry_after)
        _log.warning(
            "inference_request.retried",
            method=method,
            path=path,
            model=model,
            attempt=attempt,
            error=error,
            status=status,
            delay=delay,
        )
        await self._sleep(delay)


def _too_large(model: str | None, base_url: str, limit: int, size: int | None) -> InferenceError:
    said = f" ({size} bytes)" if size is not None else ""
    return InferenceError(
        f"inference server {base_url} answered with more than the limit of {limit} bytes"
        f"{said} (max_response_bytes)",
        retryable=False,
        model=model,
    )


def encode_json_request(
    inputs: Sequence[Tensor],
    *,
    request_id: str | None = None,
    outputs: Sequence[str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an inference request with JSON tensors."""
    body: dict[str, Any] = {"inputs": [tensor.to_json() for tensor in inputs]}
    if request_id is not None:
        body["id"] = request_id
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    # No NaN or infinity: they are not JSON (conversion refuses them before this).
    content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return content, {"Content-Type": "application/json"}


def encode_binary_request(
    inputs: Sequence[Tensor],
    *,
    request_id: str | None = None,
    outputs: Sequence[str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an inference request in the binary tensor data extension.

    The JSON header names every input with ``parameters.binary_data_size`` and no ``data``;
    the raw little-endian bytes of the inputs follow it in order. Outputs are asked for as
    binary, all of them (``binary_data_output``) or each one named (``binary_data``).
    """
    header_inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in inputs:
        blob = _raw_bytes(tensor)
        blobs.append(blob)
        header_inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {"binary_data_size": len(blob)},
            }
        )
    header: dict[str, Any] = {"inputs": header_inputs}
    if request_id is not None:
        header["id"] = request_id
    if outputs is not None:
        header["outputs"] = [
            {"name": name, "parameters": {"binary_data": True}} for name in outputs
        ]
    else:
        header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {
        HEADER_LENGTH: str(len(head)),
        "Content-Type": "application/octet-stream",
    }
    return b"".join([head, *blobs]), headers


def decode_binary_response(
    response: httpx.Response,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The JSON part of an inference answer and its output tensors, binary or JSON.

    Without ``Inference-Header-Content-Length`` the whole body is JSON. With it, the outputs
    whose ``parameters.binary_data_size`` is set take that many bytes of the tail, in order;
    a size that does not fit the shape, or bytes missing or left over, is a ValueError.
    """
    declared = response.headers.get(HEADER_LENGTH)
    body = response.content
    if declared is None:
        head, tail = body, b""
    else:
        if not declared.strip().isdigit() or int(declared) > len(body):
            raise ValueError(f"{HEADER_LENGTH} {declared!r} does not fit a body of {len(body)}")
        head, tail = body[: int(declared)], body[int(declared) :]
    try:
        answer = json.loads(head)
    except ValueError as exc:
        raise ValueError(f"the answer's JSON part is not JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise ValueError("the answer's JSON part is not an object")
    tensors: dict[str, Tensor] = {}
    offset = 0
    for item in answer.get("outputs") or ():
        parameters = item.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            tensor = _decode_tensor(item)
        else:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise ValueError(
                    f"output {item.get('name')!r} declares {size!r} binary bytes, "
                    f"{len(tail) - offset} are left in the answer"
                )
            tensor = _tensor_from_bytes(item, tail[offset : offset + size])
            offset += size
        tensors[tensor.name] = tensor
    if offset != len(tail):
        raise ValueError(f"{len(tail) - offset} binary bytes in the answer belong to no output")
    return answer, tensors


def _bytes_array(values: Any) -> npt.NDArray[Any]:
    """An object array of ``bytes`` (text as UTF-8) in the shape of ``values``."""
    array = np.asarray(values, dtype=object)
    flat = [
        value.encode("utf-8") if isinstance(value, str) else bytes(value) for value in array.ravel()
    ]
    result = np.empty(len(flat), dtype=object)
    result[:] = flat
    return result.reshape(array.shape)


def _raw_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == BYTES:
        parts: list[bytes] = []
        for value in tensor.data.ravel():
            parts.append(struct.pack("<I", len(value)))
            parts.append(bytes(value))
        return b"".join(parts)
    dtype = DATATYPES[tensor.datatype]
    # Little-endian as the extension says; BOOL as one byte per value (numpy's own layout).
    array = np.ascontiguousarray(tensor.data, dtype=dtype.newbyteorder("<"))
    return array.tobytes()


def _tensor_from_bytes(item: Mapping[str, Any], data: bytes) -> Tensor:
    name = str(item["name"])
    datatype = str(item["datatype"])
    if datatype == BYTES:
        shape = tuple(int(n) for n in item["shape"])
        values: list[bytes] = []
        offset = 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise ValueError(f"output {name!r} ends inside the length of an element")
            (length,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if offset + length > len(data):
                raise ValueError(f"output {name!r} has an element longer than its bytes")
            values.append(data[offset : offset + length])
            offset += length
        if len(values) != math.prod(shape):
            raise ValueError(f"output {name!r} has {len(values)} elements for shape {shape}")
        return Tensor(name, BYTES, _bytes_array(values).reshape(shape))
    if datatype not in DATATYPES:
        raise ValueError(f"output {name!r} has unsupported datatype {datatype!r}")
    shape = tuple(int(n) for n in item["shape"])
    dtype = DATATYPES[datatype].newbyteorder("<")
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(
            f"output {name!r} has {len(data)} binary bytes, shape {shape} of {datatype} "
            f"needs {math.prod(shape) * dtype.itemsize}"
        )
    array = np.frombuffer(data, dtype=dtype).astype(DATATYPES[datatype]).reshape(shape)
    return Tensor(name, datatype, array)


def _model_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return path


def _json_object(response: httpx.Response, model: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise InferenceError(
            f"inference server answered {response.status_code} without JSON", model=model
        ) from exc
    if not isinstance(body, dict):
        raise InferenceError("inference server answered JSON that is not an object", model=model)
    return body


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    text = response.text.strip()
    return text[:200] if text else response.reason_phrase


def _error_for(response: httpx.Response, model: str, base_url: str) -> InferenceError:
    status = response.status_code
    detail = _server_message(response)
    if status == 404:
        return ModelNotFoundError(
            f"inference server {base_url} does not serve model {model}: {detail}",
            status=status,
            model=model,
        )
    if status == 400 and "not ready" in detail.lower():
        # MLServer answers 400 "Model X is not ready yet." for infer on a loading model.
        return ModelNotReadyError(
            f"model {model} at {base_url} is not ready: {detail}", status=status, model=model
        )
    retryable = status >= 500 or status == 429
    kind = "failed" if status >= 500 else "refused the request"
    return InferenceError(
        f"model {model} at {base_url} {kind} (HTTP {status}): {detail}",
        retryable=retryable,
        status=status,
        model=model,
    )


def _tensor_spec(item: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=str(item["name"]),
        datatype=str(item["datatype"]),
        shape=tuple(int(n) for n in item.get("shape") or ()),
    )


def _decode_tensor(item: Mapping[str, Any]) -> Tensor:
    datatype = str(item["datatype"])
    if datatype == BYTES:
        shape = tuple(int(n) for n in item["shape"])
        texts = _flatten(item["data"])
        if len(texts) != math.prod(shape) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"output {item['name']!r} is no {shape} of strings")
        return Tensor(str(item["name"]), BYTES, _bytes_array(texts).reshape(shape))
    if datatype not in DATATYPES:
        raise ValueError(f"output {item['name']!r} has unsupported datatype {datatype!r}")
    shape = tuple(int(n) for n in item["shape"])
    values = _flatten(item["data"])
    dtype = DATATYPES[datatype]
    if dtype.kind == "f":
        values = [math.nan if value is None else value for value in values]
    array = np.asarray(values, dtype=dtype)
    if array.size != math.prod(shape):
        raise ValueError(f"output {item['name']!r} has {array.size} values for shape {shape}")
    return Tensor(str(item["name"]), datatype, array.reshape(shape))


def _flatten(data: Any) -> list[Any]:
    # The protocol allows nested lists in row-major order as well as a flat list.
    if not isinstance(data, list):
        raise ValueError("tensor data must be a list")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat
