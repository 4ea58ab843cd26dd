"""The inference service contract: what a service accepts, which model it calls and what its
outputs mean, declared in a file rather than coded (``docs/omi.md``, "Service contracts").

One :class:`InferenceContract` per service, read from TOML or JSON (:func:`load_contract`) or
named among the contracts shipped in ``dsf_bridge/omi/contracts/`` (:data:`SHIPPED_CONTRACTS`;
``tissue-composition`` is the reference model's). The bridge checks a request against
``accepts`` before anything leaves the site, turns the study into the model's input as
``pixels`` says, calls ``model``, checks the answer against ``outputs`` and converts it into
FHIR (``dsf_bridge.omi.conversion``).

Errors: :class:`ContractError` (a :class:`~dsf_bridge.errors.BridgeError`, not retryable) when a
file is missing or does not describe a valid contract; its message names the file and the field
(``outputs.measurements[2].unit: ...``).
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsf_bridge.errors import BridgeError, ConfigError

__all__ = [
    "CONTRACTS_DIR",
    "DATATYPES",
    "REFERENCE_CONTRACT",
    "SHIPPED_CONTRACTS",
    "Accepts",
    "ClassSpec",
    "ClassificationOutput",
    "Coding",
    "ContractError",
    "InferenceContract",
    "LabelMapOutput",
    "MeasurementOutput",
    "ModelRef",
    "Outputs",
    "PixelHandling",
    "RequestNotAcceptedError",
    "Segment",
    "Window",
    "check_catalogue",
    "contract_of",
    "describe_validation_error",
    "dicom_scheme",
    "has_dicom_scheme",
    "load_contract",
    "resolve_contract",
]

CONTRACTS_DIR = Path(__file__).resolve().with_name("contracts")
#: Contracts that ship with the bridge, by name (the file name without ``.toml``).
SHIPPED_CONTRACTS: tuple[str, ...] = ("tissue-composition", "ct-density")
#: The contract a providing site serves for a catalogue entry that names none: the reference
#: model's, which every service followed before contracts were declared.
REFERENCE_CONTRACT = "tissue-composition"

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]
# The Open Inference Protocol v2 datatypes a contract may declare (those the client decodes).
DATATYPES: tuple[str, ...] = get_args(Datatype)
# A dimension of a declared shape: a size, -1 for any, or the number of slices of the series.
Dimension = Annotated[int, Field(ge=-1)] | Literal["slices"]
# Systems of the Task inputs and outputs that are not findings (docs/protocol.md), and the
# bridge's own measurement system, whose codes the Task profiles slice as Quantities.
_WIRE_SYSTEMS = frozenset(
    {
        "http://dsf-bridge.dev/fhir/CodeSystem/omi",
        "http://dsf-bridge.dev/fhir/CodeSystem/omi-error",
        "http://dsf.dev/fhir/CodeSystem/bpmn-message",
    }
)
_MEASUREMENT_SYSTEM = "http://dsf-bridge.dev/fhir/CodeSystem/omi-measurement"
_TENSOR_NAME = r"^[A-Za-z0-9_.\-]{1,128}$"


def _floats() -> list[Datatype]:
    return ["FP32", "FP64"]


def _scalar() -> list[Dimension]:
    return [1]


def _bytes() -> list[Datatype]:
    return ["UINT8"]


class ContractError(BridgeError):
    """A contract file is missing, unreadable or invalid; the message names file and field."""

    retryable = False


class RequestNotAcceptedError(ContractError):
    """The study does not fit what the contract accepts: the request is invalid for the service
    (OMI error kind ``request-invalid``). The message names the contract field and both values."""


class _Part(BaseModel):
    # Not-a-number and infinities are no sizes, windows or spacings (TOML writes them: nan, inf).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Coding(_Part):
    """A FHIR Coding: the meaning of an output (LOINC, SNOMED CT or the provider's own system)."""

    system: str = Field(min_length=1, description="Code system URI")
    code: str = Field(min_length=1)
    display: str = Field(min_length=1, description="Human-readable name")

    def fhir(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}


class ModelRef(_Part):
    """The Open Inference Protocol v2 model the service calls."""

    name: str = Field(min_length=1, description="Model name on the inference server")
    version: str | None = Field(default=None, description="Model version (default: the server's)")


class Accepts(_Part):
    """Which studies the service takes; checked before a request leaves the requesting site
    (when that site knows the contract) and again at the provider."""

    modality: list[str] = Field(min_length=1, description="DICOM Modality values, e.g. ['CT']")
    body_part: list[str] = Field(
        default_factory=list,
        description="DICOM BodyPartExamined values; empty: any (checked where a series has one)",
    )
    series: Literal["largest", "named"] = Field(
        default="largest",
        description="'largest': the study's largest image series unless the request names one; "
        "'named': the request must name a series",
    )
    max_slices: int | None = Field(default=None, ge=1, description="Most slices a series may have")

    @field_validator("modality", "body_part")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values]


class Window(_Part):
    """Clip the pixel values to ``center ± width / 2`` (after rescaling)."""

    center: float
    width: float = Field(gt=0)


class PixelHandling(_Part):
    """How the series becomes the model's image tensor."""

    values: Literal["hounsfield", "raw"] = Field(
        default="hounsfield",
        description="'hounsfield': RescaleSlope/Intercept applied; 'raw': stored values",
    )
    slice_order: Literal["position", "instance-number"] = Field(
        default="position",
        description="Slices sorted along the slice normal, or by InstanceNumber",
    )
    dimensions: Literal[2, 3] = Field(
        default=3,
        description="3: one tensor (slices, rows, columns); 2: one slice (rows, columns), "
        "series of one slice only",
    )
    resample_mm: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None,
        description="Resample to this spacing (row, column) in mm before anything else; "
        "linear interpolation",
    )
    window: Window | None = None
    normalise: Literal["none", "unit", "zscore"] = Field(
        default="none",
        description="'unit': the window mapped to 0..1 (needs window); 'zscore': zero mean, "
        "unit variance",
    )
    histogram_bins: int | None = Field(
        default=None,
        ge=2,
        le=4096,
        description="Send features instead of pixels: the share of the windowed values in each "
        "of this many equal bins over the window, one row (1, bins); needs window",
    )
    datatype: Datatype = Field(default="FP32", description="OIP v2 datatype of the tensor")

    @field_validator("resample_mm")
    @classmethod
    def _two_values(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and len(value) != 2:
            raise ValueError("needs two values: row and column spacing in mm")
        return value

    @model_validator(mode="after")
    def _unit_needs_window(self) -> PixelHandling:
        if self.normalise == "unit" and self.window is None:
            raise ValueError("normalise = 'unit' maps the window to 0..1: declare a window")
        if self.histogram_bins is not None and (self.window is None or self.normalise == "zscore"):
            raise ValueError(
                "histogram_bins counts values over the window: declare a window (and no zscore)"
            )
        return self

    @property
    def tensor_dimensions(self) -> int:
        """How many dimensions the image tensor has: 2 for a histogram's one row of features,
        else ``dimensions``."""
        return 2 if self.histogram_bins is not None else self.dimensions


class InputTensors(_Part):
    """The names (and for the image, the shape) of the model's input tensors."""

    image: str = Field(pattern=_TENSOR_NAME, description="Name of the image tensor")
    shape: list[Dimension] | None = Field(
        default=None,
        description="Declared shape of the image tensor (-1 any size, 'slices' the series' "
        "slices); checked before the call",
    )
    spacing: str | None = Field(
        default=None,
        pattern=_TENSOR_NAME,
        description="Name of an FP32 tensor with the spacing in mm ((slice, row, column) for 3 "
        "dimensions, (row, column) for 2); none: not sent",
    )


class MeasurementOutput(_Part):
    """A scalar measurement: one Observation with a valueQuantity."""

    tensor: str = Field(pattern=_TENSOR_NAME, description="Output tensor name")
    code: Coding
    unit: str = Field(min_length=1, description="UCUM code of the value, e.g. 'cm2', 'mL', '1'")
    unit_text: str | None = Field(
        default=None, description="Unit as people read it (default: unit)"
    )
    body_site: Coding | None = Field(default=None, description="Observation.bodySite")
    datatype: list[Datatype] = Field(
        default_factory=_floats, description="Datatypes the tensor may have"
    )
    shape: list[Dimension] = Field(
        default_factory=_scalar, description="Shape the tensor must have"
    )
    reduce: Literal["first", "mean", "sum", "min", "max"] = Field(
        default="first", description="How the tensor's values become one number"
    )
    min_slices: int = Field(
        default=1, ge=1, description="Reported only for series of at least this many slices"
    )
    absent_text: str | None = Field(
        default=None, description="dataAbsentReason text when the model returns null"
    )
    segment: int | None = Field(
        default=None,
        ge=1,
        le=255,
        description="Label of the label map's segment this measures: the DICOM SR's measurement "
        "group of that segment reports it",
    )


class ClassSpec(_Part):
    """One class of a classification, in the order of the tensor's values."""

    code: Coding


class ClassificationOutput(_Part):
    """Class probabilities: one Observation, the most probable class as valueCodeableConcept
    and its probability as a component."""

    tensor: str = Field(
        pattern=_TENSOR_NAME, description="Output tensor: one probability per class"
    )
    code: Coding = Field(description="What is classified (Observation.code)")
    classes: list[ClassSpec] = Field(min_length=2)
    body_site: Coding | None = None
    datatype: list[Datatype] = Field(default_factory=_floats)


# FHIR code systems and their DICOM coding scheme designators (PS3.16 8), for DICOM SEG and SR
# codes. The bridge's own measurement system is its private scheme 99DSFB (private schemes start
# with "99", PS3.3 8.2), which the reference contract's segments use too.
_DICOM_SCHEMES = {
    "http://snomed.info/sct": "SCT",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
    "http://loinc.org": "LN",
    _MEASUREMENT_SYSTEM: "99DSFB",
}
_DESIGNATOR = re.compile(r"^[A-Za-z0-9_.\-]{1,16}$")


def dicom_scheme(system: str) -> str:
    """The DICOM coding scheme designator of a FHIR code system (a designator stays itself)."""
    return _DICOM_SCHEMES.get(system, system)


def has_dicom_scheme(system: str) -> bool:
    """Whether codes of ``system`` can be written into DICOM: a FHIR system with a DICOM coding
    scheme designator, or a designator itself."""
    return system in _DICOM_SCHEMES or bool(_DESIGNATOR.match(system))


def _dicom_codable(coding: Coding) -> Coding:
    if not has_dicom_scheme(coding.system):
        raise ValueError(
            f"system {coding.system!r} has no DICOM coding scheme designator: use "
            f"{', '.join(_DICOM_SCHEMES)} or a designator of up to 16 characters (99...)"
        )
    return coding


class Segment(_Part):
    """One label of a label map: SNOMED CT coded, as DICOM SEG requires."""

    label: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, max_length=64, description="SegmentLabel (LO)")
    category: Coding
    type: Coding

    @field_validator("category", "type")
    @classmethod
    def _codable(cls, coding: Coding) -> Coding:
        return _dicom_codable(coding)


class LabelMapOutput(_Part):
    """A label map (slices, rows, columns): a DICOM SEG with one segment per description (its
    label, name and codes), and a DICOM SR of the measurements that name its segments."""

    tensor: str = Field(pattern=_TENSOR_NAME)
    datatype: list[Datatype] = Field(default_factory=_bytes)
    on_request: bool = Field(
        default=True, description="Asked for only when the request wants a segmentation"
    )
    segments: list[Segment] = Field(min_length=1)

    @model_validator(mode="after")
    def _labels_once(self) -> LabelMapOutput:
        labels = [segment.label for segment in self.segments]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"label declared twice: {', '.join(map(str, twice))}")
        return self


class Outputs(_Part):
    measurements: list[MeasurementOutput] = Field(default_factory=list)
    classifications: list[ClassificationOutput] = Field(default_factory=list)
    label_maps: list[LabelMapOutput] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something_and_unique(self) -> Outputs:
        if not (self.measurements or self.classifications):
            raise ValueError("declare at least one measurement or classification")
        tensors: list[str] = [
            *(m.tensor for m in self.measurements),
            *(c.tensor for c in self.classifications),
            *(m.tensor for m in self.label_maps),
        ]
        codes: list[tuple[str, str]] = [
            *((m.code.system, m.code.code) for m in self.measurements),
            *((c.code.system, c.code.code) for c in self.classifications),
        ]
        repeated = sorted({t for t in tensors if tensors.count(t) > 1})
        if repeated:
            raise ValueError(f"tensor declared twice: {', '.join(repeated)}")
        twice = sorted({f"{s}|{c}" for s, c in codes if codes.count((s, c)) > 1})
        if twice:
            raise ValueError(f"code declared twice: {', '.join(twice)}")
        # Findings travel in Task inputs under their codes: the process's own and DSF's systems
        # name other inputs (their slices), and a class's Coding has no place in a slice of the
        # bridge's measurement system (a Quantity).
        reserved = sorted({f"{s}|{c}" for s, c in codes if s in _WIRE_SYSTEMS})
        if reserved:
            raise ValueError(
                f"code {', '.join(reserved)} is in a system the Task inputs use for the "
                "protocol itself: use the provider's own system"
            )
        classes = sorted(
            f"{c.code.system}|{c.code.code}"
            for c in self.classifications
            if c.code.system == _MEASUREMENT_SYSTEM
        )
        if classes:
            raise ValueError(
                f"classification {', '.join(classes)}: the bridge's measurement system holds "
                "quantities; use the provider's own system"
            )
        self._segments_declared()
        return self

    def _segments_declared(self) -> None:
        # A measurement's segment is a label of the label map that becomes the SEG (the first),
        # and its code goes into the DICOM SR: it needs a coding scheme designator there.
        labels = [s.label for s in self.label_maps[0].segments] if self.label_maps else []
        for index, measurement in enumerate(self.measurements):
            field = f"outputs.measurements[{index}]"
            if measurement.segment is None:
                continue
            if measurement.segment not in labels:
                declared = (
                    f"outputs.label_maps[0].segments declares {', '.join(map(str, labels))}"
                    if labels
                    else "outputs.label_maps is empty"
                )
                raise ValueError(
                    f"{field}.segment is {measurement.segment}, a label no segment has: {declared}"
                )
            try:
                _dicom_codable(measurement.code)
            except ValueError as exc:
                raise ValueError(
                    f"{field}.code: {exc} (a segment's measurement goes into the DICOM SR)"
                ) from None


class InferenceContract(_Part):
    """What an inference service accepts, which model it calls and what its outputs mean."""

    name: str = Field(min_length=1, description="Contract name, for messages and the report")
    title: str = Field(min_length=1, description="DiagnosticReport.code display")
    report_code: Coding = Field(description="DiagnosticReport.code")
    model: ModelRef
    accepts: Accepts
    pixels: PixelHandling = Field(default_factory=PixelHandling)
    inputs: InputTensors
    outputs: Outputs

    @model_validator(mode="after")
    def _shape_fits_dimensions(self) -> InferenceContract:
        shape = self.inputs.shape
        if shape is not None and len(shape) != self.pixels.tensor_dimensions:
            source = (
                "a histogram is one row (1, bins)"
                if self.pixels.histogram_bins is not None
                else f"pixels.dimensions is {self.pixels.dimensions}"
            )
            raise ValueError(f"inputs.shape has {len(shape)} dimensions, {source}")
        return self

    def check_series(
        self,
        *,
        modalities: Iterable[str],
        body_parts: Iterable[str] = (),
        slices: int | None = None,
        series_named: bool = True,
    ) -> None:
        """Raise :class:`RequestNotAcceptedError` unless a series with these attributes fits
        ``accepts`` (and ``pixels.dimensions``). Unknown values (no body part in the series,
        slices not counted yet) pass."""
        accepts = self.accepts
        found = sorted({value.strip().upper() for value in modalities if value.strip()})
        if not found or not set(found) <= set(accepts.modality):
            shown = ", ".join(found) or "of no modality"
            raise RequestNotAcceptedError(
                f"service contract {self.name}: accepts.modality is "
                f"{', '.join(accepts.modality)}, the series is {shown}"
            )
        parts = sorted({value.strip().upper() for value in body_parts if value.strip()})
        if accepts.body_part and parts and not set(parts) <= set(accepts.body_part):
            raise RequestNotAcceptedError(
                f"service contract {self.name}: accepts.body_part is "
                f"{', '.join(accepts.body_part)}, the series is {', '.join(parts)}"
            )
        self.check_request(series_named=series_named)
        if slices is not None and accepts.max_slices is not None and slices > accepts.max_slices:
            raise RequestNotAcceptedError(
                f"service contract {self.name}: accepts.max_slices is {accepts.max_slices}, "
                f"the series has {slices}"
            )
        if slices is not None:
            self.check_slices(slices)

    def check_request(self, *, series_named: bool = True, segmentation: bool = False) -> None:
        """Raise :class:`RequestNotAcceptedError` when the request leaves out a series the
        contract wants named, or asks for a segmentation the contract has no label map for."""
        if self.accepts.series == "named" and not series_named:
            raise RequestNotAcceptedError(
                f"service contract {self.name}: accepts.series is 'named', the request names "
                "no series"
            )
        if segmentation and not self.outputs.label_maps:
            raise RequestNotAcceptedError(
                f"service contract {self.name} declares no outputs.label_maps: it cannot "
                "answer a segmentation request"
            )

    def check_slices(self, slices: int) -> None:
        """Raise :class:`RequestNotAcceptedError` when a 2-D contract gets several slices."""
        if self.pixels.dimensions == 2 and slices != 1:
            raise RequestNotAcceptedError(
                f"service contract {self.name}: pixels.dimensions is 2 (one slice), "
                f"the series has {slices} slices"
            )

    def requested_outputs(self, *, label_maps: bool) -> list[str]:
        """The output names to ask the server for: every declared output, label maps sent on
        request only when wanted. Servers that compute outputs by name (MLServer's scikit-learn
        runtime: ``predict_proba``) need them named; OIP servers return only what a request
        names."""
        return [
            *(m.tensor for m in self.outputs.measurements),
            *(c.tensor for c in self.outputs.classifications),
            *(m.tensor for m in self.outputs.label_maps if label_maps or not m.on_request),
        ]


def describe_validation_error(error: ValidationError) -> str:
    """``field.path[index]: message`` for the first problem, and how many more there are."""
    first = error.errors()[0]
    path = ""
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field (check the spelling against docs/omi.md)"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{path or 'contract'}: {message}{suffix}"


def load_contract(path: Path | str) -> InferenceContract:
    """Read a contract from a ``.toml`` or ``.json`` file."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ContractError(
            f"contract file {file} cannot be read: {exc.strerror or type(exc).__name__}"
        ) from exc
    try:
        if file.suffix.lower() == ".json":
            raw: Any = json.loads(data)
        else:
            raw = tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if file.suffix.lower() == ".json" else "TOML"
        raise ContractError(f"contract file {file} is not valid {kind}: {exc}") from exc
    try:
        return InferenceContract.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"contract file {file}: {describe_validation_error(exc)}") from None


def contract_of(value: str | Mapping[str, Any] | None) -> InferenceContract | None:
    """The contract a catalogue entry's ``contract`` setting names: None for none, a shipped
    contract or file by its reference (read once per process), or an inline table."""
    if value is None:
        return None
    if isinstance(value, str):
        return _resolved(value.strip())
    try:
        return InferenceContract.model_validate(value)
    except ValidationError as exc:
        raise ContractError(f"inline contract: {describe_validation_error(exc)}") from None


def check_catalogue(contracts: Sequence[str | Mapping[str, Any] | None]) -> None:
    """Raise :class:`~dsf_bridge.errors.ConfigError` naming ``omi.catalogue.<n>.contract``
    unless every catalogue entry's contract loads: a bad contract stops start-up."""
    for index, value in enumerate(contracts):
        try:
            contract_of(value)
        except ContractError as exc:
            field = f"omi.catalogue.{index}.contract"
            raise ConfigError(f"{field}: {exc}", field=field) from None


@functools.lru_cache(maxsize=64)
def _resolved(reference: str) -> InferenceContract:
    return resolve_contract(reference)


def resolve_contract(reference: str) -> InferenceContract:
    """A shipped contract by name, or a contract file by path."""
    if reference in SHIPPED_CONTRACTS:
        return load_contract(CONTRACTS_DIR / f"{reference}.toml")
    if not reference.lower().endswith((".toml", ".json")):
        raise ContractError(
            f"contract {reference!r} is neither a shipped contract "
            f"({', '.join(SHIPPED_CONTRACTS)}) nor a .toml or .json file"
        )
    return load_contract(reference)
