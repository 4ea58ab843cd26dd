"""A requesting site that knows the service's contract checks the result Task against it when
it comes back (issue 12): each finding one of the contract's outputs, of the same kind, a
measurement in the declared unit, a class one of the declared classes with a probability in
0..1, every classification present. Before, anything a provider sent was stored under the
contract's display names and body sites. The checks run before the local FHIR server is asked
for anything, so no server is needed here. And the result Task's findings in an order DSF's
openAtEnd slicing accepts, whatever order the contract declares them in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.config import OmiServiceSettings, OmiSettings
from dsf_bridge.dsf.publication import read_resource
from dsf_bridge.dsf.tasks import task_input
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM
from dsf_bridge.omi.contract import load_contract
from dsf_bridge.omi.conversion import MEASUREMENT_CODE_SYSTEM, Classification
from dsf_bridge.plugins.inference import (
    PROVIDER_FAILED,
    SERVICE_OMI_SETTINGS,
    _findings,
    send_inference_result,
    store_result,
)
from dsf_bridge.plugins.placeholders import Placeholders
from dsf_bridge.plugins.registry import BpmnError, HandlerContext, SendContext
from dsf_bridge.sandbox.validation import ProfileValidator, base_profiles
from tests.reference import reference_dir

REPO = Path(__file__).resolve().parents[2]
MY_MODEL_FILE = REPO / "docs" / "examples" / "my-model.toml"
RESULT_PROFILE = "http://dsf-bridge.dev/fhir/StructureDefinition/task-inference-result"
ORG = "http://dsf.dev/sid/organization-identifier"
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


async def test_a_contract_read_from_the_registry_checks_the_result_too() -> None:
    """No catalogue entry: ResolveService kept the registry's contract as ``serviceContract``."""
    ctx = _context([_probability(250, "mg"), *_presence()], contract=False)
    ctx = HandlerContext(
        handler=ctx.handler,
        element_id=ctx.element_id,
        business_key=ctx.business_key,
        variables={
            **ctx.variables,
            "serviceContract": load_contract(MY_MODEL_FILE).model_dump(mode="json"),
        },
        services={SERVICE_OMI_SETTINGS: OmiSettings()},
    )
    with pytest.raises(BpmnError, match=r"outputs\.measurements\[0\]\.unit is '1'") as caught:
        await store_result(ctx)
    assert caught.value.code == PROVIDER_FAILED


def test_a_known_class_is_shown_with_the_contracts_display() -> None:
    # The provider's display travelled into the stored report: "present" could read "Benign".
    inputs = [
        _probability(),
        {
            "system": SYSTEM,
            "code": "nodule-presence",
            "value": {"system": SYSTEM, "code": "present", "display": "Benign, no follow-up"},
        },
        {"system": SYSTEM, "code": "nodule-presence", "value": _quantity(0.75)},
    ]
    found = _findings({"inputs": inputs}, load_contract(MY_MODEL_FILE))
    [classification] = [f for f in found if isinstance(f, Classification)]
    assert classification.value.display == "Nodule present"


async def test_without_the_contract_only_the_probability_is_checked() -> None:
    with pytest.raises(BpmnError, match=r"outside 0\.\.1"):
        await store_result(_context([*_presence(probability=-1.0)], contract=False))


def _validator() -> ProfileValidator:
    values = Placeholders("1.1", "2026-01-01", "Site_A", {})
    ours = [
        read_resource(path, values.replace_fhir_bytes(path.read_bytes(), source=str(path)))
        for path in sorted((REPO / "profiles" / "omi").glob("*/*.json"))
    ]
    return ProfileValidator([*base_profiles("1.9", reference_dir()), *ours])


def test_the_bridges_own_measurement_codes_go_first_whatever_the_contracts_order() -> None:
    # A contract declaring its own measurement before one of the reference codes: the unsliced
    # input came before a sliced one, which DSF's openAtEnd slicing refuses.
    own = {"system": SYSTEM, "code": "extra", "value": {"valueQuantity": _quantity(1)}}
    area = {
        "system": MEASUREMENT_CODE_SYSTEM,
        "code": "body-area",
        "value": {"valueQuantity": _quantity(5, "cm2")},
    }
    ctx = SendContext(
        handler="SendInferenceResult",
        element_id="SendInferenceResult",
        business_key="bk-1",
        variables={
            "modelName": "m",
            "slices": 1,
            "resultSeriesInstanceUid": "1.2.3.4",
            "findings": [own, area],
        },
    )
    send_inference_result(ctx)
    task = {
        "resourceType": "Task",
        "meta": {"profile": [f"{RESULT_PROFILE}|1.1"]},
        "instantiatesCanonical": "http://dsf-bridge.dev/bpe/Process/inferenceRequest|1.1",
        "status": "requested",
        "intent": "order",
        "authoredOn": "2026-01-01T00:00:00Z",
        "requester": {"type": "Organization", "identifier": {"system": ORG, "value": "B"}},
        "restriction": {
            "recipient": [{"type": "Organization", "identifier": {"system": ORG, "value": "A"}}]
        },
        "input": [
            task_input(BPMN_MESSAGE_SYSTEM, "message-name", "inferenceResult"),
            task_input(BPMN_MESSAGE_SYSTEM, "business-key", "bk-1"),
            *(task_input(str(i["system"]), str(i["code"]), i["value"]) for i in ctx.inputs),
        ],
    }
    assert _validator().validate(task) == []
