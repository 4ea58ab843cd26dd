"""The OMI inference models and handlers in memory (process harness, fake clock): what each
process sends, waits for and how it ends, without servers. The real exchange over sandbox sites
with Orthanc and MLServer is in test_inference.py."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.config import OmiSettings
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM
from dsf_bridge.plugins.inference import (
    CODESYSTEM_OMI,
    CODESYSTEM_OMI_ERROR,
    EXECUTION_PROCESS,
    REQUEST_PROCESS,
    SERVICE_OMI_SETTINGS,
    plugin,
)
from dsf_bridge.runtime.testing import ProcessHarness

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _harness(omi: dict[str, Any], organization: str = "Hospital_A") -> ProcessHarness:
    loaded = plugin.load(organization=organization, environment={})
    return ProcessHarness(
        list(loaded.definitions.values()),
        plugin.handlers,
        services={SERVICE_OMI_SETTINGS: OmiSettings.model_validate(omi)},
    )


def _task(message: str, requester: str, **inputs: str) -> dict[str, object]:
    values = [{"system": BPMN_MESSAGE_SYSTEM, "code": "message-name", "value": message}]
    values += [
        {"system": CODESYSTEM_OMI, "code": code.replace("_", "-"), "value": value}
        for code, value in inputs.items()
    ]
    return {"task": {"id": "task-1", "requester": requester, "inputs": values}}


# The harness has no archive and no DSF FHIR server: the request names the archive
# (transfer = "dicomweb"); the way through DSF is tested end to end in test_inference_transfer.
REQUESTER_OMI = {
    "catalogue": [
        {"id": "tissue-composition", "organization": "AI_Provider", "transfer": "dicomweb"}
    ]
}
START = {
    "study_instance_uid": STUDY,
    "dicomweb_endpoint": "https://pacs.example/dicom-web",
    "service": "tissue-composition",
}


async def test_request_goes_to_the_provider_and_times_out_after_the_default() -> None:
    async with _harness(REQUESTER_OMI) as harness:
        instance = await harness.start(
            REQUEST_PROCESS,
            "startInferenceRequest",
            business_key="bk-1",
            variables=_task("startInferenceRequest", "Hospital_A", **START),
        )
        [sent] = harness.sent
        assert sent.message_name == "inferenceRequest"
        assert sent.instantiates_canonical == (
            "http://dsf-bridge.dev/bpe/Process/inferenceExecution|1.1"
        )
        assert sent.profile == (
            "http://dsf-bridge.dev/fhir/StructureDefinition/task-inference-request|1.1"
        )
        assert sent.target == {"organizationIdentifier": "AI_Provider"}
        assert sent.business_key == "bk-1"
        assert sent.correlation_key is None
        assert {i["code"]: i["value"] for i in sent.inputs} == {
            "study-instance-uid": STUDY,
            "dicomweb-endpoint": "https://pacs.example/dicom-web",
            "service": "tissue-composition",
        }
        assert await harness.open_timers() == 1
        await harness.advance(599)
        assert instance.status == "running"
        await harness.advance(2)  # [omi] result_timeout: PT10M
        assert instance.status == "failed"
        assert await harness.open_timers() == 0
        assert (
            "result-timeout: no inference result from AI_Provider within PT10M"
            in (harness.task_status["bk-1"])
        )


async def test_a_provider_error_fails_the_request_with_its_kind() -> None:
    async with _harness(REQUESTER_OMI) as harness:
        instance = await harness.start(
            REQUEST_PROCESS,
            "startInferenceRequest",
            business_key="bk-2",
            variables=_task("startInferenceRequest", "Hospital_A", result_timeout="PT1M", **START),
        )
        await harness.message(
            "inferenceResult",
            business_key="bk-2",
            requester="AI_Provider",
            variables={
                "task": {
                    "id": "result-1",
                    "requester": "AI_Provider",
                    "inputs": [
                        {
                            "system": CODESYSTEM_OMI,
                            "code": "error-kind",
                            "value": {"system": CODESYSTEM_OMI_ERROR, "code": "model-not-ready"},
                        },
                        {"system": CODESYSTEM_OMI, "code": "error", "value": "model m is loading"},
                    ],
                }
            },
        )
        assert instance.status == "failed"
        assert await harness.open_timers() == 0  # the gateway's timer went with the message
        assert (
            "inference failed at AI_Provider (model-not-ready): model m is loading"
            in (harness.task_status["bk-2"])
        )


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"study_instance_uid": STUDY, "dicomweb_endpoint": "https://pacs.example/dw"}, "service"),
        ({**START, "study_instance_uid": "1.2.x"}, "not a DICOM UID"),
        ({**START, "dicomweb_endpoint": "ftp://pacs.example"}, "not an http(s) URL"),
        ({**START, "result_timeout": "ten minutes"}, "Not an ISO 8601 duration"),
    ],
)
async def test_a_malformed_start_task_sends_nothing(inputs: dict[str, str], expected: str) -> None:
    async with _harness(REQUESTER_OMI) as harness:
        instance = await harness.start(
            REQUEST_PROCESS,
            "startInferenceRequest",
            business_key="bk-3",
            variables=_task("startInferenceRequest", "Hospital_A", **inputs),
        )
        assert instance.status == "failed"
        assert harness.sent == []
        assert "request-invalid" in harness.task_status["bk-3"]
        assert expected in harness.task_status["bk-3"]


PROVIDER_OMI = {
    "catalogue": [
        {"id": "tissue-composition", "model_name": "m", "inference_url": "http://127.0.0.1:9"}
    ],
    "dicomweb_allowed": ["https://pacs.hospital-a.example/"],
}


@pytest.mark.parametrize(
    ("inputs", "kind", "expected"),
    [
        (
            {**START, "dicomweb_endpoint": "https://pacs.hospital-a.example/dw", "service": "x"},
            "request-refused",
            "service x is not offered at this site",
        ),
        (
            START,
            "request-refused",
            "does not fetch studies from https://pacs.example/dicom-web",
        ),
        (
            {**START, "study_instance_uid": "not-a-uid"},
            "request-invalid",
            "is not a DICOM UID",
        ),
    ],
)
async def test_the_provider_answers_a_request_it_cannot_take_with_an_error(
    inputs: dict[str, str], kind: str, expected: str
) -> None:
    async with _harness(PROVIDER_OMI, organization="AI_Provider") as harness:
        instance = await harness.start(
            EXECUTION_PROCESS,
            "inferenceRequest",
            business_key="bk-4",
            variables=_task("inferenceRequest", "Hospital_A", **inputs),
        )
        assert instance.status == "completed"
        assert harness.task_status["bk-4"] == "completed"
        [result] = harness.sent
        assert result.message_name == "inferenceResult"
        assert result.target == {"organizationIdentifier": "Hospital_A"}
        assert result.business_key == "bk-4"
        answer = {i["code"]: i["value"] for i in result.inputs}
        assert answer["error-kind"] == {
            "valueCoding": {"system": CODESYSTEM_OMI_ERROR, "code": kind}
        }
        assert expected in str(answer["error"])
        assert not any(str(i["code"]).endswith("-area") for i in result.inputs)


MY_MODEL_FILE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "my-model.toml"


@pytest.mark.parametrize(
    ("contract", "extra", "expected"),
    [
        (
            str(MY_MODEL_FILE),
            {"segmentation": True},
            "service contract my-model declares no outputs.label_maps",
        ),
        (
            {
                **tomllib.loads(MY_MODEL_FILE.read_text()),
                "accepts": {"modality": ["CT"], "series": "named"},
            },
            {},
            "service contract my-model: accepts.series is 'named', the request names no series",
        ),
    ],
    ids=["segmentation-without-label-map", "series-not-named"],
)
async def test_the_provider_refuses_what_the_contract_cannot_take(
    contract: object, extra: dict[str, object], expected: str
) -> None:
    omi = {
        "catalogue": [
            {"id": "my-model", "inference_url": "http://127.0.0.1:9", "contract": contract}
        ]
    }
    variables = _task("inferenceRequest", "Hospital_A", **{**START, "service": "my-model"})
    task = variables["task"]
    assert isinstance(task, dict)
    task["inputs"] += [
        {"system": CODESYSTEM_OMI, "code": code, "value": value} for code, value in extra.items()
    ]
    async with _harness(omi, organization="AI_Provider") as harness:
        instance = await harness.start(
            EXECUTION_PROCESS, "inferenceRequest", business_key="bk-5", variables=variables
        )
        assert instance.status == "completed"
        [result] = harness.sent
        answer = {i["code"]: i["value"] for i in result.inputs}
        assert answer["error-kind"] == {
            "valueCoding": {"system": CODESYSTEM_OMI_ERROR, "code": "request-invalid"}
        }
        assert expected in str(answer["error"])
