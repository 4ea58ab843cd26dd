"""The full service contract in the OMI registry (``docs/omi.md``, "The contract in the OMI
registry"): published on the Device as the IG's input and output Parameters and as the contract
itself with its SHA-256, read back equal, and refused with a reason when damaged or tampered."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.omi.contract import InferenceContract, load_contract, resolve_contract
from dsf_bridge.omi.contract_resources import (
    CONTRACT_EXTENSION,
    contract_bytes,
    contract_from_device,
    input_parameters,
    output_parameters,
)
from dsf_bridge.omi.publish import RegistryPublisher, ServiceOffer
from dsf_bridge.omi.registry import FhirRegistryClient
from tests.omi.fhir_registry import FhirRegistry, client, registry

__all__ = ["client", "registry"]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
ORG = "provider.test"


def _everything() -> InferenceContract:
    """A contract that sets every optional field the shipped ones leave out."""
    raw = resolve_contract("tissue-composition").model_dump(mode="json")
    raw["accepts"] |= {"body_part": ["CHEST", "ABDOMEN"], "series": "named", "max_slices": 400}
    raw["pixels"] |= {
        "values": "raw",
        "slice_order": "instance-number",
        "resample_mm": [0.75, 0.8],
        "window": {"center": 40.5, "width": 400.0},
        "normalise": "unit",
        "datatype": "INT16",
    }
    raw["inputs"]["shape"] = ["slices", 512, -1]
    first = raw["outputs"]["measurements"][0]
    first |= {
        "unit_text": "square centimetres",
        "body_site": {
            "system": "http://snomed.info/sct",
            "code": "818983003",
            "display": "Abdomen",
        },
        "datatype": ["FP64", "FP32"],
        "shape": ["slices"],
        "reduce": "max",
        "min_slices": 3,
        "absent_text": "nothing there",
    }
    raw["outputs"]["label_maps"][0] |= {"datatype": ["UINT8", "UINT16"], "on_request": False}
    raw["outputs"]["classifications"] = resolve_contract("ct-density").model_dump(mode="json")[
        "outputs"
    ]["classifications"]
    return InferenceContract.model_validate(raw)


CONTRACTS: dict[str, Callable[[], InferenceContract]] = {
    "tissue-composition": lambda: resolve_contract("tissue-composition"),
    "ct-density": lambda: resolve_contract("ct-density"),
    "my-model": lambda: load_contract(EXAMPLES / "my-model.toml"),
    "everything": _everything,
}


def _offer(contract: InferenceContract, service_id: str = "svc") -> ServiceOffer:
    return ServiceOffer(service_id, "A service", contract.model.name, "http://ai:8080", contract)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
async def test_a_published_contract_reads_back_equal_and_publishing_twice_writes_nothing(
    name: str, registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    contract = CONTRACTS[name]()
    publisher = RegistryPublisher(client, ORG)
    await publisher.publish(_offer(contract))
    writes = registry.writes

    [service] = await client.find_services()
    assert service.contract_problem is None
    assert service.contract == contract
    assert service.contract is not None
    # Every field, not only what __eq__ compares: the dumps are the same JSON.
    assert service.contract.model_dump(mode="json") == contract.model_dump(mode="json")
    assert (await client.get_service(f"{ORG}/svc")).contract == contract

    again = await publisher.publish(_offer(contract))
    assert [p.outcome for p in again] == ["unchanged"] * 3
    assert registry.writes == writes


async def test_the_ig_parameters_name_every_tensor_code_unit_class_and_segment(
    registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    contract = _everything()
    await RegistryPublisher(client, ORG).publish(_offer(contract))
    [device] = registry.all("Device")
    contained = {r["id"]: r for r in device["contained"]}
    assert {e["url"] for e in device["extension"]} >= {CONTRACT_EXTENSION}

    [image, spacing] = contained["input"]["parameter"]
    assert (image["name"], spacing["name"]) == ("hu", "spacing_mm")
    parts = [
        (p["name"], next(v for k, v in p.items() if k.startswith("value"))) for p in image["part"]
    ]
    assert ("datatype", "INT16") in parts
    assert ("shape", "slices,512,-1") in parts
    assert (
        "body-part",
        {"system": "http://omi.de/fhir/registry/CodeSystem/body-part-examined", "code": "ABDOMEN"},
    ) in parts
    assert ("window-center", 40.5) in parts
    assert ("max-slices", 400) in parts

    outputs = {p["name"]: p for p in contained["output"]["parameter"]}
    body_area = {p["name"]: p for p in outputs["body_area_cm2"]["part"]}
    assert body_area["code"]["valueCoding"]["code"] == "body-area"
    assert body_area["unit"]["valueCoding"] == {
        "system": "http://unitsofmeasure.org",
        "code": "cm2",
        "display": "square centimetres",
    }
    assert body_area["body-site"]["valueCoding"]["code"] == "818983003"
    density = resolve_contract("ct-density").outputs.classifications[0]
    classes = [
        p["valueCoding"]["code"] for p in outputs[density.tensor]["part"] if p["name"] == "class"
    ]
    assert classes == [c.code.code for c in density.classes]
    segments = [p for p in outputs["tissue_labels"]["part"] if p["name"] == "segment"]
    assert [s["part"][0]["valueInteger"] for s in segments] == [2, 3, 4, 5]
    assert outputs["report"]["valueCoding"] == contract.report_code.fhir()


async def test_a_changed_contract_updates_the_device_and_reads_back_changed(
    registry: FhirRegistry, client: FhirRegistryClient
) -> None:
    contract = resolve_contract("tissue-composition")
    publisher = RegistryPublisher(client, ORG)
    await publisher.publish(_offer(contract))
    changed = contract.model_copy(
        update={"accepts": contract.accepts.model_copy(update={"max_slices": 300})}
    )
    outcomes = [p.outcome for p in await publisher.publish(_offer(changed))]
    assert outcomes == ["updated", "unchanged", "unchanged"]
    [service] = await client.find_services()
    assert service.contract is not None
    assert service.contract.accepts.max_slices == 300


def _contract_parts(device: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [extension] = [e for e in device["extension"] if e["url"] == CONTRACT_EXTENSION]
    return {p["url"]: p for p in extension["extension"]}


def _with_data(device: dict[str, Any], data: bytes, *, rehash: bool) -> None:
    parts = _contract_parts(device)
    parts["contract"]["valueAttachment"]["data"] = base64.b64encode(data).decode()
    if rehash:
        parts["sha256"]["valueString"] = hashlib.sha256(data).hexdigest()


def _edited(edit: Callable[[dict[str, Any]], None]) -> bytes:
    raw = json.loads(contract_bytes(resolve_contract("tissue-composition")))
    edit(raw)
    return json.dumps(raw).encode()


def _unit(raw: dict[str, Any]) -> None:
    raw["outputs"]["measurements"][0]["unit"] = "mm2"


def _no_outputs(raw: dict[str, Any]) -> None:
    del raw["outputs"]


def _tamper_data_only(device: dict[str, Any]) -> None:
    _with_data(device, _edited(_unit), rehash=False)


def _tamper_data_and_hash(device: dict[str, Any]) -> None:
    _with_data(device, _edited(_unit), rehash=True)


def _tamper_parameters(device: dict[str, Any]) -> None:
    output = next(r for r in device["contained"] if r["id"] == "output")
    output["parameter"][0]["part"][2]["valueCoding"]["code"] = "mm2"


def _invalid_contract(device: dict[str, Any]) -> None:
    _with_data(device, _edited(_no_outputs), rehash=True)


def _not_base64(device: dict[str, Any]) -> None:
    _contract_parts(device)["contract"]["valueAttachment"]["data"] = "not base64!"


def _no_hash(device: dict[str, Any]) -> None:
    [extension] = [e for e in device["extension"] if e["url"] == CONTRACT_EXTENSION]
    extension["extension"] = [p for p in extension["extension"] if p["url"] != "sha256"]


def _truncated(device: dict[str, Any]) -> None:
    data = contract_bytes(resolve_contract("tissue-composition"))[:-40]
    _with_data(device, data, rehash=True)


def _deeply_nested(device: dict[str, Any]) -> None:
    """Within the size limit, nested deeper than Python's JSON parser recurses."""
    _with_data(device, b"[" * 100_000 + b"]" * 100_000, rehash=True)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            _tamper_data_only,
            r"SHA-256 is [0-9a-f]{64}, the registry entry says .*changed or damaged",
        ),
        (
            _tamper_data_and_hash,
            r"output Parameters disagree with the contract at parameter 'body_area_cm2'",
        ),
        (
            _tamper_parameters,
            r"output Parameters disagree with the contract at parameter 'body_area_cm2'",
        ),
        (_invalid_contract, r"the contract: outputs: Field required"),
        (_not_base64, r"not base64"),
        (_no_hash, r"has no 'sha256'"),
        (_truncated, r"not valid JSON"),
        (_deeply_nested, r"not valid JSON: nested too deeply"),
    ],
)
async def test_a_damaged_or_tampered_contract_is_refused_with_the_reason(
    tamper: Callable[[dict[str, Any]], None],
    reason: str,
    registry: FhirRegistry,
    client: FhirRegistryClient,
) -> None:
    await RegistryPublisher(client, ORG).publish(_offer(resolve_contract("tissue-composition")))
    [device] = registry.all("Device")
    tamper(device)
    registry.resources["Device"][device["id"]] = device

    [service] = await client.find_services()
    assert service.contract is None
    assert service.contract_problem is not None
    assert re.search(reason, service.contract_problem), service.contract_problem


def _long_hash(device: dict[str, Any]) -> None:
    _contract_parts(device)["sha256"]["valueString"] = "f" * 1_000_000


def _long_content_type(device: dict[str, Any]) -> None:
    _contract_parts(device)["contract"]["valueAttachment"]["contentType"] = "x" * 1_000_000


def _long_parameter_name(device: dict[str, Any]) -> None:
    output = next(r for r in device["contained"] if r["id"] == "output")
    output["parameter"].append({"name": "x" * 1_000_000})


def _long_unknown_field(device: dict[str, Any]) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["x" * 100_000] = 1

    _with_data(device, _edited(edit), rehash=True)


@pytest.mark.parametrize(
    "tamper", [_long_hash, _long_content_type, _long_parameter_name, _long_unknown_field]
)
async def test_a_refused_contracts_reason_quotes_no_more_than_a_little_registry_text(
    tamper: Callable[[dict[str, Any]], None],
    registry: FhirRegistry,
    client: FhirRegistryClient,
) -> None:
    """The reason goes into the log and into the start Task's error: a registry's megabyte of
    text in a field must not go along."""
    await RegistryPublisher(client, ORG).publish(_offer(resolve_contract("tissue-composition")))
    [device] = registry.all("Device")
    tamper(device)
    registry.resources["Device"][device["id"]] = device

    [service] = await client.find_services()
    assert service.contract is None
    assert service.contract_problem is not None
    assert len(service.contract_problem) < 500, service.contract_problem[:200]


def test_a_device_without_a_contract_publishes_none() -> None:
    """A provider from before contracts were published: no contract, no problem."""
    assert contract_from_device({"resourceType": "Device"}) is None


def test_the_parameters_follow_the_contract_order() -> None:
    contract = resolve_contract("tissue-composition")
    names = [p["name"] for p in output_parameters(contract)["parameter"]]
    assert names == [
        *(m.tensor for m in contract.outputs.measurements),
        *(m.tensor for m in contract.outputs.label_maps),
        "report",
    ]
    assert [p["name"] for p in input_parameters(contract)["parameter"]] == ["hu", "spacing_mm"]
