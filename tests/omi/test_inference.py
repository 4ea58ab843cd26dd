"""The Open Inference Protocol v2 client: against real MLServer serving the reference model,
and against httpx.MockTransport for answers a healthy server never gives."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dsf_bridge.errors import RemoteError
from dsf_bridge.omi.inference import (
    HttpInferenceClient,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    Tensor,
)
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import MLServerProcess, free_port
from dsf_bridge.sandbox.refmodel import TISSUES, tissue_composition
from dsf_bridge.telemetry import REGISTRY
from tests.components import BROKEN_MODEL, REFERENCE_MODEL, WARMING_MODEL
from tests.omi.test_refmodel import REFERENCE_AREAS_CM2, REFERENCE_MUSCLE_MEAN_HU

MODEL = REFERENCE_MODEL.name
FAST = RetryPolicy(attempts=3, initial_delay=0.001, max_delay=0.001, retry_after_cap=0.01)


def _infers(outcome: str) -> float:
    """Infer requests measured so far (``dsf_bridge_inference_request_duration_seconds``)."""
    name = "dsf_bridge_inference_request_duration_seconds_count"
    return REGISTRY.get_sample_value(name, {"outcome": outcome}) or 0.0


def _inputs(hu: np.ndarray, spacing: tuple[float, float, float]) -> list[Tensor]:
    return [Tensor.of("hu", hu, "FP32"), Tensor.of("spacing_mm", spacing, "FP32")]


def _ct_small_inputs(ds: Dataset) -> list[Tensor]:
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return _inputs(hu[np.newaxis], (5.0, *map(float, ds.PixelSpacing)))  # type: ignore[arg-type]


# --- real MLServer -------------------------------------------------------------------------


async def test_server_and_model_ready(mlserver: MLServerProcess) -> None:
    async with HttpInferenceClient(mlserver.base_url) as client:
        assert await client.model_ready(MODEL)
        await client.ensure_model_ready(MODEL)
        # Readiness of the whole server includes the warming model on purpose.
        assert not await client.server_ready()


async def test_metadata_names_the_model(mlserver: MLServerProcess) -> None:
    async with HttpInferenceClient(mlserver.base_url) as client:
        metadata = await client.metadata(MODEL)
    assert metadata.name == MODEL


async def test_infer_ct_small_gives_design_reference(
    mlserver: MLServerProcess, ct_small: Dataset
) -> None:
    before = _infers("ok")
    async with HttpInferenceClient(mlserver.base_url) as client:
        result = await client.infer(MODEL, _ct_small_inputs(ct_small), request_id="req-1")
    assert _infers("ok") == before + 1
    assert result.model_name == MODEL
    assert result.id == "req-1"
    for tissue, expected in REFERENCE_AREAS_CM2.items():
        area = result[f"{tissue}_area_cm2"]
        assert area.shape == (1,)
        assert area.datatype == "FP64"
        assert float(area.data[0]) == pytest.approx(expected, abs=0.01), tissue
    assert float(result["muscle_mean_hu"].data[0]) == pytest.approx(
        REFERENCE_MUSCLE_MEAN_HU, abs=0.05
    )


async def test_infer_series_matches_local_computation(
    mlserver: MLServerProcess, ct_series: list[Dataset]
) -> None:
    hu = np.stack([ds.pixel_array - 1024.0 for ds in ct_series])
    spacing = (5.0, 0.661468, 0.661468)
    expected = tissue_composition(hu, spacing)
    async with HttpInferenceClient(mlserver.base_url) as client:
        result = await client.infer(MODEL, _inputs(hu, spacing))
    for column, tissue in enumerate(TISSUES):
        np.testing.assert_allclose(
            result[f"{tissue}_area_cm2"].data, expected.area_cm2[:, column], rtol=1e-6
        )
        assert float(result[f"{tissue}_volume_ml"].data[0]) == pytest.approx(
            expected.volume_ml[column], rel=1e-6
        )


async def test_unknown_model_is_not_found(mlserver: MLServerProcess) -> None:
    async with HttpInferenceClient(mlserver.base_url) as client:
        with pytest.raises(ModelNotFoundError, match="does not serve model no-such-model") as info:
            await client.model_ready("no-such-model")
        assert not info.value.retryable
        assert info.value.status == 404
        with pytest.raises(ModelNotFoundError):
            await client.infer("no-such-model", _inputs(np.zeros((1, 2, 2)), (1, 1, 1)))


async def test_model_not_ready(mlserver: MLServerProcess, ct_small: Dataset) -> None:
    async with HttpInferenceClient(mlserver.base_url) as client:
        assert not await client.model_ready(WARMING_MODEL.name)
        with pytest.raises(ModelNotReadyError, match="is not ready") as info:
            await client.ensure_model_ready(WARMING_MODEL.name)
        assert info.value.retryable
        with pytest.raises(ModelNotReadyError, match="not ready"):
            await client.infer(WARMING_MODEL.name, _ct_small_inputs(ct_small))


async def test_wrong_input_shape_is_refused_not_retried(mlserver: MLServerProcess) -> None:
    async with HttpInferenceClient(mlserver.base_url) as client:
        with pytest.raises(InferenceError, match=r"refused the request \(HTTP 400\)") as info:
            await client.infer(MODEL, _inputs(np.zeros((4, 4)), (1.0, 1.0, 1.0)))
    assert info.value.status == 400
    assert not info.value.retryable
    assert "shape" in info.value.message
    assert not isinstance(info.value, ModelNotReadyError)


async def test_model_crash_is_a_retryable_server_error(
    mlserver: MLServerProcess, ct_small: Dataset
) -> None:
    async with HttpInferenceClient(mlserver.base_url) as client:
        with pytest.raises(InferenceError, match=r"failed \(HTTP 500\)") as info:
            await client.infer(BROKEN_MODEL.name, _ct_small_inputs(ct_small))
    assert info.value.retryable
    assert info.value.model == BROKEN_MODEL.name


class BlinkingFront:
    """A loopback front for MLServer that is down for ``down_for`` seconds (connections
    refused), then answers one request 503 with ``Retry-After: 1``, then forwards to MLServer:
    a model server restarting behind its gateway."""

    def __init__(self, upstream: str, down_for: float) -> None:
        self.upstream = urlsplit(upstream)
        self.down_for = down_for
        self.port = free_port()
        self.answers: list[str] = []
        self._server: asyncio.Server | None = None
        self._opener: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> BlinkingFront:
        self._opener = asyncio.create_task(self._open_later())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._opener is not None
        await self._opener
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _open_later(self) -> None:
        await asyncio.sleep(self.down_for)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.answers:
            self.answers.append("503")
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            writer.close()
            return
        self.answers.append("forwarded")
        up_reader, up_writer = await asyncio.open_connection(
            self.upstream.hostname, self.upstream.port
        )
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def blinking(mlserver: MLServerProcess) -> AsyncIterator[BlinkingFront]:
    async with BlinkingFront(mlserver.base_url, down_for=0.5) as front:
        yield front


async def test_inference_outlasts_a_model_server_blip(
    blinking: BlinkingFront, ct_small: Dataset
) -> None:
    """Refused connections, then 503 with Retry-After: the default policy waits it out."""
    started = time.monotonic()
    async with HttpInferenceClient(blinking.base_url) as client:
        result = await client.infer(MODEL, _ct_small_inputs(ct_small))
    assert blinking.answers == ["503", "forwarded"]
    # Retry-After: 1 was honoured (the policy's own next wait is 2 s; 1 s at least either way).
    assert time.monotonic() - started >= 1.0 + blinking.down_for
    assert float(result["muscle_mean_hu"].data[0]) == pytest.approx(
        REFERENCE_MUSCLE_MEAN_HU, abs=0.05
    )


async def test_unreachable_server_is_retryable() -> None:
    async with HttpInferenceClient(
        f"http://127.0.0.1:{free_port()}", timeout=2.0, retry=FAST
    ) as client:
        with pytest.raises(InferenceError, match=r"unreachable \(3 attempts") as info:
            await client.model_ready(MODEL)
    assert info.value.retryable
    assert isinstance(info.value, RemoteError)


# --- httpx.MockTransport ---------------------------------------------------------------------


def _mock(handler: httpx.MockTransport) -> HttpInferenceClient:
    return HttpInferenceClient("http://inference.test", transport=handler, retry=FAST)


async def test_request_body_is_typed_tensors() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        assert request.url.raw_path == b"/v2/models/m%2Fx/versions/2/infer"
        return httpx.Response(
            200,
            json={
                "model_name": "m/x",
                "outputs": [
                    {
                        "name": "nested",
                        "datatype": "INT16",
                        "shape": [2, 2],
                        "data": [[1, 2], [3, 4]],
                    },
                    {"name": "gap", "datatype": "FP64", "shape": [2], "data": [1.5, None]},
                ],
            },
        )

    async with _mock(httpx.MockTransport(handler)) as client:
        result = await client.infer(
            "m/x", [Tensor.of("x", [[1, 2, 3]], "INT16")], version="2", outputs=["nested"]
        )
    assert seen[0]["inputs"] == [
        {"name": "x", "datatype": "INT16", "shape": [1, 3], "data": [1, 2, 3]}
    ]
    assert seen[0]["outputs"] == [{"name": "nested"}]
    assert result["nested"].data.dtype == np.int16
    assert result["nested"].data.tolist() == [[1, 2], [3, 4]]
    assert np.isnan(result["gap"].data[1])
    with pytest.raises(InferenceError, match="no output 'missing'"):
        result["missing"]


@pytest.mark.parametrize(
    ("status", "retryable", "tries"),
    [
        (429, True, 3),
        (503, True, 3),
        # A gateway's 502/504 may come while the model computes: the POST is not repeated.
        (502, True, 1),
        (504, True, 1),
        # The model itself failed: retryable for the runtime, not repeated at once.
        (500, True, 1),
        (400, False, 1),
        (403, False, 1),
        (422, False, 1),
    ],
)
async def test_status_codes_decide_retryable_and_4xx_are_never_repeated(
    status: int, retryable: bool, tries: int
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, text="nope", headers={"Retry-After": "0"})

    async with _mock(httpx.MockTransport(handler)) as client:
        with pytest.raises(InferenceError) as info:
            await client.infer("m", [Tensor.of("x", [1], "FP32")])
    assert info.value.retryable is retryable
    assert info.value.status == status
    assert len(seen) == tries


async def test_timeout_is_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with _mock(httpx.MockTransport(handler)) as client:
        with pytest.raises(InferenceError, match="in time") as info:
            await client.metadata("m")
    assert info.value.retryable


async def test_malformed_outputs_are_an_error() -> None:
    body = {"outputs": [{"name": "y", "datatype": "FP32", "shape": [3], "data": [1.0]}]}
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json=body))
    async with _mock(transport) as client:
        with pytest.raises(InferenceError, match="malformed outputs"):
            await client.infer("m", [Tensor.of("x", [1], "FP32")])


def test_unknown_datatype_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        Tensor.of("x", [1], "BF17")


@pytest.mark.parametrize(("status", "ready"), [(200, True), (400, False), (503, False)])
async def test_model_ready_verdicts(status: int, ready: bool) -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(status))
    async with _mock(transport) as client:
        assert await client.model_ready("m") is ready


async def test_model_ready_server_failure_is_an_error_not_a_verdict() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(500, json={"error": "boom"}))
    async with _mock(transport) as client:
        with pytest.raises(InferenceError, match="boom") as info:
            await client.model_ready("m")
    assert info.value.retryable
