"""A requesting site that knows the service's contract checks the result Task against it when
it comes back (issue 12): each finding one of the contract's outputs, of the same kind, a
measurement in the declared unit, a class one of the declared classes with a probability in
0..1, every classification present. Before, anything a provider sent was stored under the
contract's display names and body sites. The checks run before the local FHIR server is asked
for anything, so no server is needed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.config import OmiServiceSettings, OmiSettings
from dsf_bridge.plugins.inference import (
    PROVIDER_FAILED,
    SERVICE_OMI_SETTINGS,
    store_result,
)
from dsf_bridge.plugins.registry import BpmnError, HandlerContext

MY_MODEL_FILE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "my-model.toml"
SYSTEM = "http://ai-provider.example.org/fhir/CodeSystem/my-model"
UCUM = "http://unitsofmeasure.org"


def _probability(value: float = 0.75, unit: str = "1") -> dict[str, Any]:
    return {"system": SYSTEM, "code": "nodule-probability", "value": _quantity(value, unit)}


def _quantity(value: float, unit: str = "1") -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _presence(code: str = "present", probability: float = 0.75) -> list[dict[str, Any]]:
    return [
        {"system": SYSTEM, "code": "nodule-presence", "value": {"system": SYSTEM, "code": code}},
        {"system": SYSTEM, "code": "nodule-presence", "value": _quantity(probability)},
    ]


def _context(inputs: list[dict[str, Any]], *, contract: bool = True) -> HandlerContext:
    entry = OmiServiceSettings(
        id="my-model",
        organization="AI_Provider",
        contract=str(MY_MODEL_FILE) if contract else None,
    )
    return HandlerContext(
        handler="StoreResult",
        element_id="StoreResult",
        business_key="bk-1",
        variables={
            "task": {"id": "result-1", "requester": "AI_Provider", "inputs": inputs},
            "studyInstanceUid": "1.2.3.4",
            "startTaskId": "start-1",
            "serviceId": "my-model",
        },
        services={SERVICE_OMI_SETTINGS: OmiSettings(catalogue=[entry])},
    )


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            [_probability(250, "mg"), *_presence()],
            r"measurement nodule-probability is in 'mg'; service contract my-model "
            r"outputs\.measurements\[0\]\.unit is '1'",
        ),
        (
            [_probability(), *_presence("malignant")],
            r"class .*\|malignant for nodule-presence is not one of service contract my-model "
            r"outputs\.classifications\[0\]\.classes",
        ),
        (
            [_probability()],
            r"the result has no classification nodule-presence \(service contract my-model "
            r"outputs\.classifications\[0\]\)",
        ),
        (
            [
                _probability(),
                *_presence(),
                {"system": "http://loinc.org", "code": "1234-5", "value": _quantity(1)},
            ],
            r"measurement http://loinc\.org\|1234-5 is not one of service contract my-model's "
            r"outputs\.measurements",
        ),
        (
            [{"system": SYSTEM, "code": "nodule-presence", "value": _quantity(0.5)}],
            r"measurement .*\|nodule-presence is not one of service contract my-model's "
            r"outputs\.measurements",
        ),
        (
            [_probability(), *_presence(probability=42.0)],
            r"classification nodule-presence has the probability 42\.0, outside 0\.\.1",
        ),
    ],
    ids=["unit", "class", "missing-classification", "undeclared", "kind", "probability"],
)
async def test_a_result_that_breaks_the_known_contract_fails_naming_the_field(
    inputs: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(BpmnError, match=message) as caught:
        await store_result(_context(inputs))
    assert caught.value.code == PROVIDER_FAILED


async def test_without_the_contract_only_the_probability_is_checked() -> None:
    with pytest.raises(BpmnError, match=r"outside 0\.\.1"):
        await store_result(_context([*_presence(probability=-1.0)], contract=False))
