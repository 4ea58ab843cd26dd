"""A service contract as it stands in the OMI registry, and read back from it (``docs/omi.md``,
"The contract in the OMI registry").

The provider's ``Device`` carries the contract twice:

- as the OMI Protocol IG's input and output ``Parameters``, contained in the Device
  (``#input``, ``#output``) and referenced by extensions of ours (:data:`INPUT_EXTENSION`,
  :data:`OUTPUT_EXTENSION`): one ``parameter`` per input tensor and per output, their details as
  ``part``\\ s, so that a reader of the IG sees the tensors, codes, units, classes and segments;
- losslessly, as the contract's JSON in an ``Attachment`` with its SHA-256
  (:data:`CONTRACT_EXTENSION`), for everything the IG has no element for (pixel handling,
  shapes, reductions, ...). This is what :func:`contract_from_device` reads; the Parameters must
  then be exactly what that contract produces, so a registry entry whose parts disagree is
  refused as well.

The SHA-256 finds a contract changed without its hash (a hand edit, a truncation, a server
rewriting the attachment); it is no signature: whoever may write the registry may write both.

Errors: :class:`~dsf_bridge.omi.contract.ContractError` (not retryable) naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from dsf_bridge.omi.contract import (
    Coding,
    ContractError,
    InferenceContract,
    describe_validation_error,
)

__all__ = [
    "BODY_PART_SYSTEM",
    "CONTRACT_EXTENSION",
    "INPUT_EXTENSION",
    "MAX_CONTRACT_BYTES",
    "MODALITY_SYSTEM",
    "OUTPUT_EXTENSION",
    "contract_bytes",
    "contract_elements",
    "contract_from_device",
    "input_parameters",
    "output_parameters",
]

_OURS = "http://dsf-bridge.dev/fhir/StructureDefinition"
#: Complex extension on the Device: sub-extensions ``contract`` (valueAttachment, the contract
#: as JSON) and ``sha256`` (valueString, lower-case hex of the attachment's bytes).
CONTRACT_EXTENSION = f"{_OURS}/omi-service-contract"
#: Extensions on the Device referencing its contained input and output Parameters.
INPUT_EXTENSION = f"{_OURS}/omi-input-parameters"
OUTPUT_EXTENSION = f"{_OURS}/omi-output-parameters"
#: The largest contract read back (bytes of JSON); the shipped ones are a few KiB.
MAX_CONTRACT_BYTES = 256 * 1024
#: DICOM's code system (PS3.16): its modality codes (CID 29) are DICOM's Modality values.
MODALITY_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
#: DICOM BodyPartExamined values (PS3.16 Annex L) as codes; DICOM gives them no code system.
BODY_PART_SYSTEM = "http://omi.de/fhir/registry/CodeSystem/body-part-examined"
_UCUM = "http://unitsofmeasure.org"


def contract_bytes(contract: InferenceContract) -> bytes:
    """The contract as canonical JSON (sorted keys, no spaces): the same contract, the same
    bytes, so publishing twice writes nothing."""
    return json.dumps(
        contract.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
    ).encode("utf-8")


def _part(name: str, kind: str, value: object) -> dict[str, Any]:
    return {"name": name, f"value{kind}": value}


def _coded(name: str, coding: Coding | Mapping[str, str]) -> dict[str, Any]:
    value = coding.fhir() if isinstance(coding, Coding) else dict(coding)
    return {"name": name, "valueCoding": value}


def _shape(shape: list[int | str]) -> str:
    return ",".join(str(size) for size in shape)


def input_parameters(contract: InferenceContract) -> dict[str, Any]:
    """The IG's input ``Parameters``: the image (or features) tensor with what the study must
    be and how pixels become the tensor, and the spacing tensor when the model takes one."""
    accepts, pixels, inputs = contract.accepts, contract.pixels, contract.inputs
    parts: list[dict[str, Any]] = [
        _part("role", "Code", "features" if pixels.histogram_bins is not None else "image"),
        _part("datatype", "Code", pixels.datatype),
    ]
    if inputs.shape is not None:
        parts.append(_part("shape", "String", _shape(list(inputs.shape))))
    parts += [_coded("modality", {"system": MODALITY_SYSTEM, "code": m}) for m in accepts.modality]
    parts += [
        _coded("body-part", {"system": BODY_PART_SYSTEM, "code": b}) for b in accepts.body_part
    ]
    parts.append(_part("series", "Code", accepts.series))
    if accepts.max_slices is not None:
        parts.append(_part("max-slices", "Integer", accepts.max_slices))
    parts += [
        _part("values", "Code", pixels.values),
        _part("slice-order", "Code", pixels.slice_order),
        _part("dimensions", "Integer", pixels.dimensions),
    ]
    for spacing in pixels.resample_mm or ():
        parts.append(_part("resample-mm", "Decimal", spacing))
    if pixels.window is not None:
        parts.append(_part("window-center", "Decimal", pixels.window.center))
        parts.append(_part("window-width", "Decimal", pixels.window.width))
    parts.append(_part("normalise", "Code", pixels.normalise))
    if pixels.histogram_bins is not None:
        parts.append(_part("histogram-bins", "Integer", pixels.histogram_bins))
    parameters = [{"name": inputs.image, "part": parts}]
    if inputs.spacing is not None:
        parameters.append(
            {
                "name": inputs.spacing,
                "part": [
                    _part("role", "Code", "spacing"),
                    _part("datatype", "Code", "FP32"),
                    _part("shape", "String", str(pixels.tensor_dimensions)),
                ],
            }
        )
    return {"resourceType": "Parameters", "id": "input", "parameter": parameters}


def output_parameters(contract: InferenceContract) -> dict[str, Any]:
    """The IG's output ``Parameters``: one per output tensor (``valueCoding``-coded parts for
    the finding's code, UCUM unit, body site, classes and segments), and the report's code."""
    parameters: list[dict[str, Any]] = []
    for m in contract.outputs.measurements:
        unit = {
            "system": _UCUM,
            "code": m.unit,
            **({"display": m.unit_text} if m.unit_text else {}),
        }
        parts = [_part("kind", "Code", "measurement"), _coded("code", m.code), _coded("unit", unit)]
        if m.body_site is not None:
            parts.append(_coded("body-site", m.body_site))
        parts += [_part("datatype", "Code", d) for d in m.datatype]
        parts += [
            _part("shape", "String", _shape(list(m.shape))),
            _part("reduce", "Code", m.reduce),
            _part("min-slices", "Integer", m.min_slices),
        ]
        if m.absent_text is not None:
            parts.append(_part("absent-text", "String", m.absent_text))
        if m.segment is not None:
            parts.append(_part("segment", "Integer", m.segment))
        parameters.append({"name": m.tensor, "part": parts})
    for c in contract.outputs.classifications:
        parts = [_part("kind", "Code", "classification"), _coded("code", c.code)]
        parts += [_coded("class", spec.code) for spec in c.classes]
        if c.body_site is not None:
            parts.append(_coded("body-site", c.body_site))
        parts += [_part("datatype", "Code", d) for d in c.datatype]
        parameters.append({"name": c.tensor, "part": parts})
    for label_map in contract.outputs.label_maps:
        parts = [_part("kind", "Code", "label-map")]
        parts += [_part("datatype", "Code", d) for d in label_map.datatype]
        parts.append(_part("on-request", "Boolean", label_map.on_request))
        parts += [
            {
                "name": "segment",
                "part": [
                    _part("label", "Integer", s.label),
                    _part("name", "String", s.name),
                    _coded("category", s.category),
                    _coded("type", s.type),
                ],
            }
            for s in label_map.segments
        ]
        parameters.append({"name": label_map.tensor, "part": parts})
    parameters.append(_coded("report", contract.report_code))
    return {"resourceType": "Parameters", "id": "output", "parameter": parameters}


def contract_elements(contract: InferenceContract) -> dict[str, Any]:
    """What a Device gets for its contract: ``contained`` (the input and output Parameters) and
    ``extension`` (the contract with its SHA-256, and the references to the Parameters)."""
    data = contract_bytes(contract)
    return {
        "contained": [input_parameters(contract), output_parameters(contract)],
        "extension": [
            {
                "url": CONTRACT_EXTENSION,
                "extension": [
                    {
                        "url": "contract",
                        "valueAttachment": {
                            "contentType": "application/json",
                            "data": base64.b64encode(data).decode("ascii"),
                            "size": len(data),
                            "title": contract.name,
                        },
                    },
                    {"url": "sha256", "valueString": hashlib.sha256(data).hexdigest()},
                ],
            },
            {"url": INPUT_EXTENSION, "valueReference": {"reference": "#input"}},
            {"url": OUTPUT_EXTENSION, "valueReference": {"reference": "#output"}},
        ],
    }


def contract_from_device(device: Mapping[str, Any]) -> InferenceContract | None:
    """The contract a Device publishes, checked: None when it publishes none (a provider from
    before contracts were published); :class:`ContractError` naming the reason when its data is
    damaged, its SHA-256 does not match, it is no valid contract, or its Parameters say
    something else than it does."""
    extensions = [
        e
        for e in device.get("extension") or ()
        if isinstance(e, Mapping) and e.get("url") == CONTRACT_EXTENSION
    ]
    if not extensions:
        return None
    if len(extensions) > 1:
        raise ContractError(f"the Device has {len(extensions)} contract extensions, one allowed")
    parts = {
        p.get("url"): p for p in extensions[0].get("extension") or () if isinstance(p, Mapping)
    }
    attachment = (parts.get("contract") or {}).get("valueAttachment")
    if not isinstance(attachment, Mapping) or not isinstance(attachment.get("data"), str):
        raise ContractError("the contract extension has no 'contract' attachment with data")
    if attachment.get("contentType") != "application/json":
        raise ContractError(
            f"the contract attachment is {_quoted(attachment.get('contentType'))}, not "
            "application/json"
        )
    encoded = attachment["data"]
    if len(encoded) > MAX_CONTRACT_BYTES * 4 // 3 + 4:
        raise ContractError(f"the contract is larger than {MAX_CONTRACT_BYTES} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ContractError(f"the contract attachment is not base64: {exc}") from None
    declared = (parts.get("sha256") or {}).get("valueString")
    if not isinstance(declared, str) or not declared:
        raise ContractError("the contract extension has no 'sha256'")
    actual = hashlib.sha256(data).hexdigest()
    if actual != declared.strip().lower():
        raise ContractError(
            f"the contract's SHA-256 is {actual}, the registry entry says "
            f"{_quoted(declared)}: "
            "the contract was changed or damaged"
        )
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"the contract is not valid JSON: {exc}") from None
    except RecursionError:
        # A registry entry's contract must not crash the search that read it (every service).
        raise ContractError("the contract is not valid JSON: nested too deeply") from None
    try:
        contract = InferenceContract.model_validate(raw)
    except ValidationError as exc:
        described = describe_validation_error(exc)
        if len(described) > 4 * _QUOTED_CHARACTERS:  # a field path of the registry's making
            described = f"{described[: 4 * _QUOTED_CHARACTERS]}... ({len(described)} characters)"
        raise ContractError(f"the contract: {described}") from None
    _check_parameters(device, contract)
    return contract


# What a refusal quotes of a registry's text: the reason goes into the log and the start
# Task's error, which a registry's megabyte in one field must not fill.
_QUOTED_CHARACTERS = 80


def _quoted(value: object) -> str:
    shown = repr(value)
    if len(shown) <= _QUOTED_CHARACTERS:
        return shown
    return f"{shown[:_QUOTED_CHARACTERS]}... ({len(shown)} characters)"


def _check_parameters(device: Mapping[str, Any], contract: InferenceContract) -> None:
    contained = {
        str(r.get("id")): r
        for r in device.get("contained") or ()
        if isinstance(r, Mapping) and r.get("resourceType") == "Parameters"
    }
    for expected in (input_parameters(contract), output_parameters(contract)):
        which = expected["id"]
        found = contained.get(which)
        if found is None:
            raise ContractError(f"the Device has no contained {which} Parameters (#{which})")
        published = list(found.get("parameter") or ())
        for index, parameter in enumerate(expected["parameter"]):
            if index >= len(published) or published[index] != parameter:
                raise ContractError(
                    f"the {which} Parameters disagree with the contract at parameter "
                    f"{parameter['name']!r}"
                )
        if len(published) > len(expected["parameter"]):
            extra = published[len(expected["parameter"])]
            name = extra.get("name") if isinstance(extra, Mapping) else extra
            raise ContractError(
                f"the {which} Parameters name {_quoted(name)}, which the contract does not declare"
            )
