"""The provider's SEG package when its result cannot be delivered (process harness, fake
clock): the requester never learns of the package, so no receipt and no retention timer would
ever delete it."""

from __future__ import annotations

from typing import Any

from dsf_bridge.config import OmiSettings
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM
from dsf_bridge.errors import RemoteError
from dsf_bridge.plugins.inference import (
    CODESYSTEM_OMI,
    EXECUTION_PROCESS,
    SERVICE_OMI_SETTINGS,
    plugin,
)
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.testing import ProcessHarness

PREFIX = "dsf_bridge.plugins.inference."
PACKAGE = "https://dsf.ai-provider.example/fhir/Binary/6f1c2e0a-8f0b-4d7e-9a51-2a1e7f0c9b3d"
PROVIDER_OMI = {
    "catalogue": [
        {
            "id": "tissue-composition",
            "model_name": "tissue-composition",
            "inference_url": "http://127.0.0.1:9/",
        }
    ]
}


def _handlers(withdrawn: list[str]) -> HandlerRegistry:
    """The plugin's handlers, with inference (a SEG package stored) and the withdrawal done in
    memory: what is tested is which steps run when the result is not delivered."""
    registry = HandlerRegistry()

    def run_inference(ctx: HandlerContext) -> None:
        ctx.set("findings", [])
        ctx.set("modelName", "tissue-composition")
        ctx.set("resultSeriesInstanceUid", "2.25.200")
        ctx.set("slices", 1)
        ctx.set("resultPackage", PACKAGE)
        ctx.set("resultDocument", "DocumentReference/d-1")
        ctx.set("resultPackageStored", True)

    def withdraw_result(ctx: HandlerContext) -> None:
        package = ctx.get("resultPackage")
        if isinstance(package, str):
            withdrawn.append(package)

    replaced: dict[str, Any] = {
        PREFIX + "RunInference": run_inference,
        PREFIX + "WithdrawResult": withdraw_result,
    }
    for name, handler in plugin.handlers._handlers.items():
        registry.register(name, handler.kind, replaced.get(name, handler.function))
    return registry


def _request() -> dict[str, Any]:
    inputs: list[dict[str, Any]] = [
        {"system": BPMN_MESSAGE_SYSTEM, "code": "message-name", "value": "inferenceRequest"},
        {"system": CODESYSTEM_OMI, "code": "study-instance-uid", "value": "2.25.300"},
        {"system": CODESYSTEM_OMI, "code": "series-instance-uid", "value": "2.25.200"},
        {
            "system": CODESYSTEM_OMI,
            "code": "study-package",
            "value": {
                "reference": "https://dsf.hospital-a.example/fhir/Binary/1b2c",
                "type": "Binary",
            },
        },
        {"system": CODESYSTEM_OMI, "code": "service", "value": "tissue-composition"},
    ]
    return {"task": {"id": "task-1", "requester": "Hospital_A", "inputs": inputs}}


async def test_an_undelivered_result_withdraws_its_seg_package() -> None:
    withdrawn: list[str] = []
    loaded = plugin.load(organization="AI_Provider", environment={})
    async with ProcessHarness(
        list(loaded.definitions.values()),
        _handlers(withdrawn),
        services={SERVICE_OMI_SETTINGS: OmiSettings.model_validate(PROVIDER_OMI)},
    ) as harness:

        async def unreachable(task: object) -> str:
            raise RemoteError("POST Task: connection refused", retryable=False)

        harness.gateway.send_task = unreachable  # type: ignore[method-assign]
        instance = await harness.start(
            EXECUTION_PROCESS, "inferenceRequest", business_key="bk-1", variables=_request()
        )
        await harness.advance(60)
        assert withdrawn == [PACKAGE]
        assert instance.status == "failed", instance.status
        status = harness.task_status["bk-1"]
        assert status.startswith("failed: "), status
        assert "result-not-delivered" in status and "connection refused" in status, status
