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

Payloads are never logged: tensors hold image data.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
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
    "DATATYPES",
    "HttpInferenceClient",
    "InferenceError",
    "InferenceResult",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "Tensor",
    "TensorSpec",
]

_log = structlog.get_logger()

# Answers that say "the server, or a gateway in front of it, is briefly unavailable".
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Answers that say the request was not processed: the only ones an inference POST repeats on
# (a 502/504 from a gateway may come while the model still computes the first copy).
_NOT_PROCESSED = frozenset({429, 503})
# Readiness calls: 503 is a verdict (KServe's "not ready"), not a failure to repeat.
_READINESS_RETRY_STATUSES = _RETRY_STATUSES - {503}

# OIP v2 datatypes and the numpy dtypes they travel as (BYTES is not needed by our models).
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
        if datatype not in DATATYPES:
            raise ValueError(f"unsupported tensor datatype {datatype!r}")
        return cls(name, datatype, np.asarray(values, dtype=DATATYPES[datatype]))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": list(self.shape),
            "data": self.data.ravel().tolist(),
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
    ) -> None:
        self.base_url = base_url.rstrip("/")
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

    async def infer(
        self,
        model: str,
        inputs: Sequence[Tensor],
        *,
        version: str | None = None,
        request_id: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferenceResult:
        """``/v2/models/{name}/infer`` with JSON tensors; the answer's tensors as numpy arrays."""
        body: dict[str, Any] = {"inputs": [tensor.to_json() for tensor in inputs]}
        if request_id is not None:
            body["id"] = request_id
        if outputs is not None:
            body["outputs"] = [{"name": name} for name in outputs]
        with timed(INFERENCE_SECONDS):
            response = await self._request(
                "POST", f"{_model_path(model, version)}/infer", model=model, json=body
            )
            if response.status_code != 200:
                raise _error_for(response, model, self.base_url)
        answer = _json_object(response, model)
        try:
            tensors = {
                str(item["name"]): _decode_tensor(item) for item in answer.get("outputs") or ()
            }
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

    async def _request(
        self,
        method: str,
        path: str,
        *,
        model: str | None,
        json: Any = None,
        retry_statuses: frozenset[int] = _RETRY_STATUSES,
    ) -> httpx.Response:
        """One call with the retry policy; the last answer, whatever its status."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._client.request(method, path, json=json)
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
