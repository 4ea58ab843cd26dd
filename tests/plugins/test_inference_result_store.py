"""Storing an OMI result is idempotent (issue 10): the handler runs at least once, and a crash
after its POST and before the step's commit runs it again; the site keeps one result Bundle."""

from __future__ import annotations

from typing import Any

from dsf_bridge.dsf.vocabulary import READ_ACCESS_TAG_SYSTEM
from dsf_bridge.omi.conversion import MEASUREMENT_CODE_SYSTEM
from dsf_bridge.plugins.inference import RESULT_BUNDLE_IDENTIFIER_SYSTEM, store_result
from dsf_bridge.plugins.registry import SERVICE_FHIR_CLIENT, HandlerContext
from tests.sandbox.harness import LOCAL, Sandbox, sandbox, sandbox_ca, sandbox_sites

__all__ = ["sandbox", "sandbox_ca", "sandbox_sites"]


def _result_task(task_id: str) -> dict[str, Any]:
    """The ``task`` variable of a result Task with two measurements."""
    return {
        "id": task_id,
        "requester": "provider.example.org",
        "inputs": [
            {
                "system": MEASUREMENT_CODE_SYSTEM,
                "code": "muscle-area",
                "value": {"value": 41.5, "unit": "cm2"},
            },
            {
                "system": MEASUREMENT_CODE_SYSTEM,
                "code": "adipose-mean-hu",
                "value": {"value": -95.0, "unit": "[hnsf'U]"},
            },
        ],
    }


async def _store(sandbox: Sandbox, task_id: str) -> HandlerContext:
    async with sandbox.client(LOCAL) as client:
        ctx = HandlerContext(
            handler="StoreResult",
            element_id="StoreResult",
            business_key="bk-1",
            variables={
                "task": _result_task(task_id),
                "studyInstanceUid": "1.2.3.4",
                "startTaskId": "start-1",
                "modelName": "tissue-composition",
            },
            services={SERVICE_FHIR_CLIENT: client},
        )
        await store_result(ctx)
    return ctx


def _bundles(sandbox: Sandbox) -> list[dict[str, Any]]:
    return list(sandbox.server.service.store.all("Bundle"))


async def test_storing_the_same_result_twice_keeps_one_bundle(sandbox: Sandbox) -> None:
    first = await _store(sandbox, "result-1")
    again = await _store(sandbox, "result-1")  # the handler's second run after a crash

    (bundle,) = _bundles(sandbox)
    assert bundle["identifier"] == {"system": RESULT_BUNDLE_IDENTIFIER_SYSTEM, "value": "result-1"}
    assert bundle["meta"]["tag"][0] == {"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"}
    assert (
        first.updates["resultBundle"] == again.updates["resultBundle"] == (f"Bundle/{bundle['id']}")
    )

    await _store(sandbox, "result-2")  # another result is another Bundle
    assert len(_bundles(sandbox)) == 2
