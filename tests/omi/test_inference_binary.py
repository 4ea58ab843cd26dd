"""Binary tensors (the OIP v2 binary tensor data extension) and the encoding chosen per server:
against real KServe (which reads and writes binary over REST) and real MLServer (JSON only),
and against httpx.MockTransport for answers a healthy server never gives."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dsf_bridge.omi.inference import (
    DATATYPES,
    HEADER_LENGTH,
    HttpInferenceClient,
    InferenceError,
    Tensor,
    TensorEncoding,
    TensorLimitError,
    decode_binary_response,
    encode_binary_request,
)
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import KServeProcess, MLServerProcess
from dsf_bridge.sandbox.refmodel import TISSUES, tissue_composition, tissue_labels
from tests.components import REFERENCE_MODEL
from tests.omi.test_refmodel import REFERENCE_AREAS_CM2, REFERENCE_MUSCLE_MEAN_HU

MODEL = REFERENCE_MODEL.name
FAST = RetryPolicy(attempts=3, initial_delay=0.001, max_delay=0.001, retry_after_cap=0.01)


class Recording(httpx.AsyncBaseTransport):
    """The real network, with every request and the headers of every answer kept."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []
        self.answers: list[httpx.Headers] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        response = await self._inner.handle_async_request(request)
        self.answers.append(response.headers)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()

    def infers(self) -> list[tuple[bool, bool]]:
        """(request binary, answer binary) of every inference POST."""
        return [
            (HEADER_LENGTH.lower() in request.headers, HEADER_LENGTH.lower() in answer)
            for request, answer in zip(self.requests, self.answers, strict=True)
            if request.url.path.endswith("/infer")
        ]


def _series_inputs(ct_series: list[Dataset]) -> tuple[np.ndarray, list[Tensor]]:
    hu = np.stack([ds.pixel_array - 1024.0 for ds in ct_series]).astype(np.float32)
    spacing = (5.0, 0.661468, 0.661468)
    return hu, [Tensor.of("hu", hu, "FP32"), Tensor.of("spacing_mm", spacing, "FP32")]


def _ct_small_inputs(ds: Dataset) -> list[Tensor]:
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    spacing = (5.0, *map(float, ds.PixelSpacing))
    return [Tensor.of("hu", hu[np.newaxis], "FP32"), Tensor.of("spacing_mm", spacing, "FP32")]


# --- real KServe and MLServer --------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["binary", "json"])
async def test_kserve_answers_ct_small_with_design_reference(
    kserve: KServeProcess, ct_small: Dataset, encoding: TensorEncoding
) -> None:
    wire = Recording()
    async with HttpInferenceClient(
        kserve.base_url, transport=wire, tensor_encoding=encoding
    ) as client:
        result = await client.infer(MODEL, _ct_small_inputs(ct_small), request_id="req-1")
    assert wire.infers() == [(encoding == "binary", encoding == "binary")]
    assert result.id == "req-1"
    for tissue, expected in REFERENCE_AREAS_CM2.items():
        area = result[f"{tissue}_area_cm2"]
        assert (area.shape, area.datatype) == ((1,), "FP64")
        assert float(area.data[0]) == pytest.approx(expected, abs=0.01), tissue
    assert float(result["muscle_mean_hu"].data[0]) == pytest.approx(
        REFERENCE_MUSCLE_MEAN_HU, abs=0.05
    )


async def test_kserve_binary_series_and_label_map_match_local_computation(
    kserve: KServeProcess, ct_series: list[Dataset]
) -> None:
    hu, inputs = _series_inputs(ct_series)
    expected = tissue_composition(hu, (5.0, 0.661468, 0.661468))
    names = [f"{tissue}_area_cm2" for tissue in TISSUES] + ["tissue_labels"]
    async with HttpInferenceClient(kserve.base_url, tensor_encoding="binary") as client:
        result = await client.infer(MODEL, inputs, outputs=names)
    assert set(result.outputs) == set(names)
    for column, tissue in enumerate(TISSUES):
        np.testing.assert_allclose(
            result[f"{tissue}_area_cm2"].data, expected.area_cm2[:, column], rtol=1e-6
        )
    labels = result["tissue_labels"]
    assert labels.datatype == "UINT8"
    assert labels.data.dtype == np.dtype(np.uint8)
    np.testing.assert_array_equal(labels.data, tissue_labels(hu))


async def test_auto_chooses_binary_for_kserve_from_its_metadata(
    kserve: KServeProcess, ct_small: Dataset
) -> None:
    wire = Recording()
    async with HttpInferenceClient(kserve.base_url, transport=wire, tensor_encoding="auto") as c:
        before = c.binary
        await c.infer(MODEL, _ct_small_inputs(ct_small))
        await c.infer(MODEL, _ct_small_inputs(ct_small))
        assert (before, c.binary) == (None, True)
    # One look at the server metadata, then binary both ways, no JSON try.
    assert [r.url.path for r in wire.requests].count("/v2") == 1
    assert wire.infers() == [(True, True), (True, True)]


async def test_auto_chooses_json_for_mlserver_which_cannot_read_binary(
    mlserver: MLServerProcess, ct_small: Dataset
) -> None:
    wire = Recording()
    async with HttpInferenceClient(mlserver.base_url, transport=wire, tensor_encoding="auto") as c:
        result = await c.infer(MODEL, _ct_small_inputs(ct_small))
        assert c.binary is False
    assert wire.infers() == [(False, False)]
    assert float(result["body_area_cm2"].data[0]) == pytest.approx(
        REFERENCE_AREAS_CM2["body"], abs=0.01
    )
    # Why auto must not send binary to MLServer: its REST endpoint fails on such a body.
    async with HttpInferenceClient(mlserver.base_url, tensor_encoding="binary", retry=FAST) as c:
        with pytest.raises(InferenceError, match="HTTP 500"):
            await c.infer(MODEL, _ct_small_inputs(ct_small))


async def test_answer_larger_than_the_limit_is_refused(
    kserve: KServeProcess, ct_series: list[Dataset]
) -> None:
    _, inputs = _series_inputs(ct_series)
    async with HttpInferenceClient(
        kserve.base_url, tensor_encoding="binary", max_response_bytes=4096
    ) as client:
        # The label map alone is slices x rows x columns bytes, far above 4 KiB.
        with pytest.raises(InferenceError, match=r"limit of 4096 bytes.*max_response_bytes"):
            await client.infer(MODEL, inputs, outputs=["tissue_labels"])
        # Small answers pass the same limit.
        result = await client.infer(MODEL, inputs, outputs=["body_volume_ml"])
    assert result["body_volume_ml"].shape == (1,)


# --- the encoding on its own ----------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_binary_round_trip_of_every_datatype(datatype: str) -> None:
    values = np.arange(-3, 9).reshape(3, 4) % 2 if datatype == "BOOL" else np.arange(12)
    tensor = Tensor.of("t", np.asarray(values).reshape(3, 4), datatype)
    content, headers = encode_binary_request([tensor], outputs=["t"])
    length = int(headers[HEADER_LENGTH])
    header = json.loads(content[:length])
    size = tensor.data.size * DATATYPES[datatype].itemsize
    assert header["inputs"] == [
        {
            "name": "t",
            "datatype": datatype,
            "shape": [3, 4],
            "parameters": {"binary_data_size": size},
        }
    ]
    assert header["outputs"] == [{"name": "t", "parameters": {"binary_data": True}}]
    assert len(content) == length + size
    # The server's answer in the same layout decodes to the same tensor.
    answer = {"outputs": [dict(header["inputs"][0])]}
    head = json.dumps(answer).encode()
    response = httpx.Response(
        200, content=head + content[length:], headers={HEADER_LENGTH: str(len(head))}
    )
    _, tensors = decode_binary_response(response)
    assert tensors["t"].data.dtype == DATATYPES[datatype]
    np.testing.assert_array_equal(tensors["t"].data, tensor.data)


def test_bytes_tensors_follow_the_extension_in_binary_and_travel_as_text_in_json() -> None:
    tensor = Tensor.of("words", [["ab", ""], ["é", "xyz"]], "BYTES")
    # Byte strings are taken as they are, text as UTF-8.
    assert Tensor.of("b", np.array([b"\xc3\xa9"], dtype=object), "BYTES").data.tolist() == [
        tensor.data[1, 0]
    ]
    assert tensor.nbytes == 4 * 4 + 2 + 0 + 2 + 3
    assert tensor.to_json()["data"] == ["ab", "", "é", "xyz"]
    content, headers = encode_binary_request([tensor])
    length = int(headers[HEADER_LENGTH])
    raw = content[length:]
    assert raw == (b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9\x03\x00\x00\x00xyz")
    [declared] = json.loads(content[:length])["inputs"]
    assert declared["parameters"] == {"binary_data_size": len(raw)}
    cases = [
        (raw, None),
        (raw[:-1], "declares 23 binary bytes, 22 are left"),
        (raw + b"\x01", "1 binary bytes in the answer belong to no output"),
    ]
    for tail, reason in cases:
        head = json.dumps({"outputs": [dict(declared)]}).encode()
        response = httpx.Response(200, content=head + tail, headers={HEADER_LENGTH: str(len(head))})
        if reason is None:
            _, tensors = decode_binary_response(response)
            assert tensors["words"].data.tolist() == [[b"ab", b""], [b"\xc3\xa9", b"xyz"]]
        else:
            with pytest.raises(ValueError, match=reason):
                decode_binary_response(response)
    # Sizes that add up but elements that do not: too long, cut inside a length, too few.
    for tail, reason in (
        (b"\x09\x00\x00\x00ab", "an element longer than its bytes"),
        (b"\x01\x00\x00\x00a\x00\x00", "ends inside the length"),
        (b"\x01\x00\x00\x00a", "1 elements for shape \\(2, 2\\)"),
    ):
        item = {**declared, "parameters": {"binary_data_size": len(tail)}}
        head = json.dumps({"outputs": [item]}).encode()
        response = httpx.Response(200, content=head + tail, headers={HEADER_LENGTH: str(len(head))})
        with pytest.raises(ValueError, match=reason):
            decode_binary_response(response)
    # In JSON answers BYTES come as strings.
    text = {"outputs": [{"name": "w", "datatype": "BYTES", "shape": [2], "data": ["a", "é"]}]}
    _, tensors = decode_binary_response(httpx.Response(200, json=text))
    assert tensors["w"].data.tolist() == [b"a", b"\xc3\xa9"]


def test_binary_bytes_are_little_endian_whatever_the_array() -> None:
    big = np.array([1, 256], dtype=">i2")
    content, headers = encode_binary_request([Tensor("t", "INT16", big)])
    assert content[int(headers[HEADER_LENGTH]) :] == b"\x01\x00\x00\x01"
    assert json.loads(content[: int(headers[HEADER_LENGTH])])["parameters"] == {
        "binary_data_output": True
    }


# --- httpx.MockTransport ---------------------------------------------------------------------


def _mock(
    handler: Callable[[httpx.Request], httpx.Response], **options: object
) -> HttpInferenceClient:
    return HttpInferenceClient(
        "http://inference.test",
        transport=httpx.MockTransport(handler),
        retry=FAST,
        **options,  # type: ignore[arg-type]
    )


def _binary_answer(outputs: list[dict[str, Any]], tail: bytes, **extra: str) -> httpx.Response:
    head = json.dumps({"model_name": "m", "outputs": outputs}).encode()
    return httpx.Response(
        200, content=head + tail, headers={HEADER_LENGTH: extra.get("length", str(len(head)))}
    )


ONE_INPUT = [Tensor.of("x", [1.0, 2.0], "FP32")]
FP32_OUT: dict[str, object] = {
    "name": "y",
    "datatype": "FP32",
    "shape": [2],
    "parameters": {"binary_data_size": 8},
}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        # Fewer bytes than the output declares.
        (_binary_answer([FP32_OUT], b"\x00" * 4), "declares 8 binary bytes, 4 are left"),
        # A declared size that does not fit the shape.
        (
            _binary_answer([{**FP32_OUT, "parameters": {"binary_data_size": 4}}], b"\x00" * 4),
            "has 4 binary bytes, shape \\(2,\\) of FP32 needs 8",
        ),
        # Bytes no output claims.
        (_binary_answer([FP32_OUT], b"\x00" * 12), "4 binary bytes .* belong to no output"),
        # A header length past the body.
        (_binary_answer([FP32_OUT], b"\x00" * 8, length="100000"), "does not fit a body"),
        # A header length cutting the JSON.
        (_binary_answer([FP32_OUT], b"\x00" * 8, length="10"), "JSON part is not JSON"),
    ],
)
async def test_malformed_binary_answer_fails_cleanly(answer: httpx.Response, reason: str) -> None:
    async with _mock(lambda _: answer, tensor_encoding="binary") as client:
        with pytest.raises(InferenceError, match=f"malformed outputs: .*{reason}") as info:
            await client.infer("m", ONE_INPUT)
    assert not info.value.retryable


async def test_auto_falls_back_to_json_on_an_unknown_server_and_remembers() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2":
            return httpx.Response(200, json={"name": "other", "extensions": []})
        binary = HEADER_LENGTH.lower() in request.headers
        seen.append("binary" if binary else "json")
        if binary:
            return httpx.Response(415, text="unsupported media type")
        body = json.loads(request.content)
        assert body["inputs"][0]["data"] == [1.0, 2.0]
        return httpx.Response(
            200, json={"outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [3]}]}
        )

    async with _mock(handler, tensor_encoding="auto") as client:
        first = await client.infer("m", ONE_INPUT)
        second = await client.infer("m", ONE_INPUT)
        assert client.binary is False
    assert seen == ["binary", "json", "json"]
    assert float(first["y"].data[0]) == float(second["y"].data[0]) == 3.0


async def test_auto_takes_binary_when_the_server_lists_the_extension() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2":
            return httpx.Response(
                200, json={"name": "triton", "extensions": ["binary_tensor_data"]}
            )
        assert HEADER_LENGTH.lower() in request.headers
        length = int(request.headers[HEADER_LENGTH])
        raw = request.content[length:]
        assert np.frombuffer(raw, "<f4").tolist() == [1.0, 2.0]
        return _binary_answer([FP32_OUT], raw)

    async with _mock(handler, tensor_encoding="auto") as client:
        result = await client.infer("m", ONE_INPUT)
        assert client.binary is True
    assert result["y"].data.tolist() == [1.0, 2.0]


async def test_auto_stays_undecided_when_the_model_fails_both_ways() -> None:
    seen: list[bool] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2":
            return httpx.Response(404)
        seen.append(HEADER_LENGTH.lower() in request.headers)
        return httpx.Response(400, json={"error": "bad input"})

    async with _mock(handler, tensor_encoding="auto") as client:
        with pytest.raises(InferenceError, match="bad input"):
            await client.infer("m", ONE_INPUT)
        assert client.binary is None
    assert seen == [True, False]


@pytest.mark.parametrize("encoding", ["json", "binary", "auto"])
async def test_request_over_the_byte_limit_is_refused_before_sending(
    encoding: TensorEncoding,
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500)

    volume = Tensor.of("hu", np.zeros((4, 8, 8)), "FP32")  # 1024 bytes
    async with _mock(handler, tensor_encoding=encoding, max_request_bytes=1000) as client:
        with pytest.raises(TensorLimitError, match=r"1024 bytes.*limit of 1000.*max_request_bytes"):
            await client.infer("m", [volume])
    assert seen == []
    assert math.prod(volume.shape) * 4 == 1024


async def test_declared_answer_size_over_the_limit_is_refused_unread() -> None:
    big = json.dumps({"outputs": [], "pad": "x" * 5000}).encode()
    async with _mock(lambda _: httpx.Response(200, content=big), max_response_bytes=1000) as client:
        with pytest.raises(InferenceError, match=f"limit of 1000 bytes \\({len(big)} bytes\\)"):
            await client.infer("m", ONE_INPUT)


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(ValueError, match="tensor_encoding"):
        HttpInferenceClient("http://x", tensor_encoding="xml")  # type: ignore[arg-type]
