"""Conversion at both ends of a model call, as the service contract
(:mod:`dsf_bridge.omi.contract`) declares it: DICOM pixels to the model's input tensors, and the
model's outputs to FHIR R4 resources (JSON dicts).

Input side: one series is checked against the contract's ``accepts``, its slices ordered (along
the slice normal, or by InstanceNumber), its pixels rescaled (RescaleSlope/RescaleIntercept for
Hounsfield units, or left raw), optionally resampled in-plane, windowed and normalised, and
given the datatype and shape the contract names; the spacing comes from PixelSpacing and the
distance between slice positions (SpacingBetweenSlices, then SliceThickness for one slice).

Output side: the answer is checked against the contract's ``outputs`` (every declared tensor
present, of an allowed datatype and shape); each measurement becomes an ``Observation`` with a
``valueQuantity`` in its UCUM unit, each classification an ``Observation`` with the most probable
class as ``valueCodeableConcept`` and its probability as a component; a ``DiagnosticReport``
groups them. Both point at the study by its Study Instance UID (identifier system
``urn:dicom:uid``, value ``urn:oid:<uid>``) and the Observations name the ``device`` (the model)
that measured. No patient attribute is ever read from the DICOM data or written to FHIR: no
subject, names, birth dates or patient IDs.

Errors: :class:`~dsf_bridge.omi.contract.RequestNotAcceptedError` when the series does not fit
the contract, :class:`ImageConversionError` (a :class:`~dsf_bridge.errors.BridgeError`, not
retryable) when the images cannot feed the model, :class:`OutputConversionError` when the
model's outputs do not match the contract.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from scipy import ndimage

from dsf_bridge.errors import BridgeError
from dsf_bridge.omi.contract import Coding, InferenceContract, RequestNotAcceptedError
from dsf_bridge.omi.inference import DATATYPES, InferenceResult, Tensor

__all__ = [
    "DICOM_UID_SYSTEM",
    "MEASUREMENT_CODE_SYSTEM",
    "PROBABILITY",
    "UCUM",
    "Classification",
    "Finding",
    "ImageConversionError",
    "ImageVolume",
    "Measurement",
    "OutputConversionError",
    "check_outputs",
    "findings",
    "measurements_from_bundle",
    "model_inputs",
    "report_bundle",
    "study_reference",
    "volume_from_datasets",
]

DICOM_UID_SYSTEM = "urn:dicom:uid"
UCUM = "http://unitsofmeasure.org"
# The bridge's own codes (the process plugin's CodeSystem resource in profiles/ publishes them):
# the reference contract's measurements, and the probability component of a classification.
MEASUREMENT_CODE_SYSTEM = "http://dsf-bridge.dev/fhir/CodeSystem/omi-measurement"
PROBABILITY = Coding(
    system=MEASUREMENT_CODE_SYSTEM, code="probability", display="Probability of the class"
)
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_REPORT_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0074"
# Rounding a softmax in FP32 may land a hair outside 0..1.
_PROBABILITY_SLACK = 1e-6
_REDUCE = {"first": None, "mean": np.mean, "sum": np.sum, "min": np.min, "max": np.max}


class ImageConversionError(BridgeError):
    """The images cannot be turned into the model's input (missing spacing, mixed sizes)."""

    retryable = False


class OutputConversionError(BridgeError):
    """The model's outputs do not match the contract, or carry nonsense."""

    retryable = False


@dataclass(frozen=True)
class ImageVolume:
    """One series ordered as the contract says, its pixels rescaled or raw, with its geometry."""

    pixels: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]  # slice, row, column
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]

    @property
    def slices(self) -> int:
        return int(self.pixels.shape[0])


def volume_from_datasets(
    datasets: Sequence[Dataset],
    contract: InferenceContract,
    *,
    series_instance_uid: str | None = None,
) -> ImageVolume:
    """Stack the images of one series into an :class:`ImageVolume` after checking the series
    against ``contract.accepts``.

    With several series and none named, the series with the most images is taken.
    """
    images = [ds for ds in datasets if "PixelData" in ds]
    if not images:
        raise ImageConversionError("no image with pixel data was retrieved")
    named = series_instance_uid is not None
    if series_instance_uid is None:
        counts = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in images)
        series_instance_uid = counts.most_common(1)[0][0]
    images = [ds for ds in images if str(ds.get("SeriesInstanceUID", "")) == series_instance_uid]
    if not images:
        raise ImageConversionError(f"no image of series {series_instance_uid} was retrieved")
    contract.check_series(
        modalities=[str(ds.get("Modality", "")) for ds in images],
        body_parts=[str(ds.get("BodyPartExamined", "") or "") for ds in images],
        slices=len(images),
        series_named=named,
    )
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in images):
        raise ImageConversionError(
            f"series {series_instance_uid} holds multi-frame images; one frame per instance "
            "(classic CT, MR) is supported"
        )
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in images}
    if len(shapes) != 1:
        raise ImageConversionError(
            f"series {series_instance_uid} mixes image sizes {sorted(shapes)}"
        )
    # Only a contract that sends the spacing or resamples needs it; others take any image.
    needs_spacing = contract.inputs.spacing is not None or contract.pixels.resample_mm is not None
    row_mm, column_mm = (
        _pixel_spacing(images[0], series_instance_uid)
        if needs_spacing or "PixelSpacing" in images[0]
        else (1.0, 1.0)
    )
    if contract.pixels.slice_order == "instance-number":
        ordered, slice_mm = _by_instance_number(images, series_instance_uid)
    else:
        ordered, slice_mm = _order_slices(images, series_instance_uid)
    rescale = contract.pixels.values == "hounsfield"
    pixels = np.stack([_pixels(ds, rescale=rescale) for ds in ordered]).astype(np.float32)
    return ImageVolume(
        pixels=pixels,
        spacing_mm=(slice_mm, row_mm, column_mm),
        study_instance_uid=str(ordered[0].StudyInstanceUID),
        series_instance_uid=series_instance_uid,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in ordered),
    )


def model_inputs(
    volume: ImageVolume, contract: InferenceContract, *, max_bytes: int | None = None
) -> list[Tensor]:
    """The model's input tensors: the image as ``contract.pixels`` and ``contract.inputs``
    declare it, and the spacing tensor when the contract names one.

    ``max_bytes`` is the request's limit (``max_request_bytes``): a series whose image, after
    resampling, would be larger at the contract's datatype (one byte per pixel for a histogram
    contract, which sends features) is refused with :class:`RequestNotAcceptedError` before
    the image is made (a fine target spacing multiplies the pixels), so the working copies
    stay within a small multiple of it."""
    handling = contract.pixels
    slice_mm, row_mm, column_mm = volume.spacing_mm
    if max_bytes is not None:
        slices, rows, columns = volume.pixels.shape
        if handling.resample_mm is not None:
            rows = round(rows * row_mm / handling.resample_mm[0])
            columns = round(columns * column_mm / handling.resample_mm[1])
        per_pixel = (
            1
            if handling.histogram_bins is not None
            else np.dtype(DATATYPES[handling.datatype]).itemsize
        )
        size = slices * rows * columns * per_pixel
        if size > max_bytes:
            resampled = f" (resampled to {handling.resample_mm} mm)" if handling.resample_mm else ""
            raise RequestNotAcceptedError(
                f"the series would make a {slices}x{rows}x{columns} image{resampled} of "
                f"{size:,} bytes as {handling.datatype}, more than the limit of {max_bytes:,} "
                "bytes per request at this site (max_request_bytes)"
            )
    data = volume.pixels.astype(np.float64)
    if handling.resample_mm is not None:
        target_row, target_column = handling.resample_mm
        data = ndimage.zoom(data, (1.0, row_mm / target_row, column_mm / target_column), order=1)
        row_mm, column_mm = target_row, target_column
    if handling.window is not None:
        low = handling.window.center - handling.window.width / 2
        high = handling.window.center + handling.window.width / 2
        data = np.clip(data, low, high)
        if handling.normalise == "unit":
            data = (data - low) / (high - low)
    if handling.normalise == "zscore":
        deviation = float(data.std())
        data = (data - float(data.mean())) / (deviation if deviation > 0 else 1.0)
    if handling.dimensions == 2:
        contract.check_slices(volume.slices)
        data = data[0]
    if handling.histogram_bins is not None and handling.window is not None:
        unit = handling.normalise == "unit"
        window = handling.window
        data = _histogram(
            data,
            handling.histogram_bins,
            (0.0, 1.0)
            if unit
            else (window.center - window.width / 2, window.center + window.width / 2),
        )
    if DATATYPES[handling.datatype].kind in "iub":
        data = np.rint(data)
    if DATATYPES[handling.datatype].kind in "iu" and data.size:
        # A cast would wrap around silently (-849 HU as UINT8 is 175): refuse instead.
        limits = np.iinfo(DATATYPES[handling.datatype])
        low, high = float(data.min()), float(data.max())
        if low < limits.min or high > limits.max:
            raise ImageConversionError(
                f"the pixel values {low:g}..{high:g} do not fit contract {contract.name} "
                f"pixels.datatype {handling.datatype} ({limits.min}..{limits.max}): declare a "
                "window and normalisation or a wider datatype"
            )
    image = Tensor.of(contract.inputs.image, data, handling.datatype)
    declared = contract.inputs.shape
    if declared is not None and not _fits(image.shape, declared, volume.slices):
        raise ImageConversionError(
            f"input {image.name!r} would have shape {list(image.shape)}; contract "
            f"{contract.name} inputs.shape is {_shown(declared, volume.slices)}"
        )
    tensors = [image]
    if contract.inputs.spacing is not None:
        spacing = (slice_mm, row_mm, column_mm) if handling.dimensions == 3 else (row_mm, column_mm)
        tensors.append(Tensor.of(contract.inputs.spacing, spacing, "FP32"))
    return tensors


def _histogram(
    data: npt.NDArray[np.float64], bins: int, value_range: tuple[float, float]
) -> npt.NDArray[np.float64]:
    """The share of the windowed values in each of ``bins`` equal bins over the window: one
    row of features, comparable between images."""
    counts, _ = np.histogram(data, bins=bins, range=value_range)
    features: npt.NDArray[np.float64] = (counts / data.size).reshape(1, bins)
    return features


def _pixels(ds: Dataset, *, rescale: bool) -> npt.NDArray[np.float64]:
    try:
        pixels: npt.NDArray[np.float64] = ds.pixel_array.astype(np.float64)
    except (ValueError, RuntimeError, AttributeError) as exc:
        # pydicom: NotImplementedError (a RuntimeError) for a transfer syntax it cannot
        # decode, ValueError for damaged pixel data. One study's images, not the bridge's
        # failure: in a consortium cohort it is counted, and the run goes on.
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        named = getattr(syntax, "name", None) or "unknown transfer syntax"
        raise ImageConversionError(
            f"the pixel data of an image cannot be decoded ({named}, {type(exc).__name__})"
        ) from exc
    if rescale:
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        pixels = pixels * slope + intercept
    return pixels


def _by_instance_number(images: Sequence[Dataset], series: str) -> tuple[list[Dataset], float]:
    thickness = _positive(images[0].get("SpacingBetweenSlices")) or _positive(
        images[0].get("SliceThickness")
    )
    # InstanceNumber is type 2: present, maybe empty.
    numbers: dict[int, int] = {}
    for ds in images:
        try:
            numbers[id(ds)] = int(ds.get("InstanceNumber"))
        except (TypeError, ValueError):
            raise ImageConversionError(
                f"series {series} lacks InstanceNumber: cannot order it"
            ) from None
    if len(set(numbers.values())) != len(images):
        raise ImageConversionError(f"series {series} has two images with one InstanceNumber")
    ordered = sorted(images, key=lambda ds: numbers[id(ds)])
    return ordered, thickness or 1.0


def _pixel_spacing(ds: Dataset, series: str) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise ImageConversionError(f"series {series} has no PixelSpacing: the contract needs it")
    row_mm, column_mm = float(spacing[0]), float(spacing[1])
    if not (row_mm > 0 and column_mm > 0):
        raise ImageConversionError(f"series {series} has a PixelSpacing that is not positive")
    return row_mm, column_mm


def _order_slices(images: Sequence[Dataset], series: str) -> tuple[list[Dataset], float]:
    thickness = _positive(images[0].get("SpacingBetweenSlices")) or _positive(
        images[0].get("SliceThickness")
    )
    if len(images) == 1:
        return list(images), thickness or 1.0
    if any("ImagePositionPatient" not in ds for ds in images):
        raise ImageConversionError(f"series {series} lacks ImagePositionPatient: cannot order it")
    orientation = images[0].get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0]
    normal = np.cross(
        np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    )
    positions = {
        id(ds): float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))
        for ds in images
    }
    ordered = sorted(images, key=lambda ds: positions[id(ds)])
    gaps = np.diff([positions[id(ds)] for ds in ordered])
    if np.any(np.isclose(gaps, 0.0)):
        raise ImageConversionError(f"series {series} has two slices at the same position")
    return ordered, float(np.median(gaps))


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


# --- outputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One reported number in its UCUM ``unit``; ``value`` is None when the model found
    nothing to measure (``absent_text`` says what)."""

    code: Coding
    value: float | None
    unit: str
    unit_text: str | None = None
    body_site: Coding | None = None
    absent_text: str | None = None

    def quantity(self) -> dict[str, Any]:
        """The FHIR Quantity of a present value."""
        if self.value is None:
            raise ValueError(f"measurement {self.code.code} has no value")
        return {
            "value": round(self.value, 4),
            "unit": self.unit_text or self.unit,
            "system": UCUM,
            "code": self.unit,
        }


@dataclass(frozen=True)
class Classification:
    """The most probable class of a classification output, with its probability."""

    code: Coding
    value: Coding
    probability: float
    body_site: Coding | None = None

    def quantity(self) -> dict[str, Any]:
        """The probability as a FHIR Quantity (UCUM ``1``)."""
        return {"value": round(self.probability, 4), "unit": "1", "system": UCUM, "code": "1"}


Finding = Measurement | Classification


def check_outputs(
    result: InferenceResult,
    contract: InferenceContract,
    *,
    slices: int,
    label_maps: bool = False,
) -> None:
    """Raise :class:`OutputConversionError` unless the answer holds every output the contract
    declares (label maps only when asked for), each of an allowed datatype and shape. The
    message names the tensor and the contract field."""
    declared: list[tuple[str, str, Sequence[str], Sequence[int | str] | None]] = []
    for index, measurement in enumerate(contract.outputs.measurements):
        if slices >= measurement.min_slices:
            declared.append(
                (
                    f"outputs.measurements[{index}]",
                    measurement.tensor,
                    measurement.datatype,
                    measurement.shape,
                )
            )
    for index, classification in enumerate(contract.outputs.classifications):
        declared.append(
            (
                f"outputs.classifications[{index}]",
                classification.tensor,
                classification.datatype,
                None,
            )
        )
    if label_maps:
        for index, label_map in enumerate(contract.outputs.label_maps):
            declared.append(
                (
                    f"outputs.label_maps[{index}]",
                    label_map.tensor,
                    label_map.datatype,
                    ["slices", -1, -1],
                )
            )
    for field, name, datatypes, shape in declared:
        tensor = result.outputs.get(name)
        where = f"contract {contract.name} {field}"
        if tensor is None:
            raise OutputConversionError(
                f"model {result.model_name} returned no output {name!r} ({where}.tensor)"
            )
        if tensor.datatype not in datatypes:
            raise OutputConversionError(
                f"output {name!r} of model {result.model_name} is {tensor.datatype}; "
                f"{where}.datatype allows {', '.join(datatypes)}"
            )
        if shape is not None and not _fits(tensor.shape, shape, slices):
            raise OutputConversionError(
                f"output {name!r} of model {result.model_name} has shape "
                f"{list(tensor.shape)}; {where}.shape is {_shown(shape, slices)}"
            )
    for index, classification in enumerate(contract.outputs.classifications):
        size = result.outputs[classification.tensor].data.size
        if size != len(classification.classes):
            raise OutputConversionError(
                f"output {classification.tensor!r} of model {result.model_name} has {size} "
                f"values; contract {contract.name} outputs.classifications[{index}].classes "
                f"declares {len(classification.classes)}"
            )


def findings(result: InferenceResult, contract: InferenceContract, *, slices: int) -> list[Finding]:
    """The contract's measurements and classifications from a checked answer
    (:func:`check_outputs`), in the contract's order."""
    check_outputs(result, contract, slices=slices)
    found: list[Finding] = []
    for index, measurement in enumerate(contract.outputs.measurements):
        if slices < measurement.min_slices:
            continue
        values = np.asarray(result.outputs[measurement.tensor].data, dtype=np.float64).ravel()
        if values.size == 0:
            raise OutputConversionError(
                f"output {measurement.tensor!r} of model {result.model_name} is empty"
            )
        if np.any(np.isinf(values)):
            # NaN is null (no value); an infinity is no number FHIR or JSON can carry.
            raise OutputConversionError(
                f"output {measurement.tensor!r} of model {result.model_name} holds an infinite "
                f"value (contract {contract.name} outputs.measurements[{index}])"
            )
        reduce = _REDUCE[measurement.reduce]
        with np.errstate(over="ignore"):
            value = float(values[0]) if reduce is None else float(reduce(values))
        if math.isinf(value):
            raise OutputConversionError(
                f"output {measurement.tensor!r} of model {result.model_name} reduces to an "
                f"infinite value (contract {contract.name} outputs.measurements[{index}].reduce "
                f"is {measurement.reduce})"
            )
        found.append(
            Measurement(
                code=measurement.code,
                value=None if math.isnan(value) else value,
                unit=measurement.unit,
                unit_text=measurement.unit_text,
                body_site=measurement.body_site,
                absent_text=measurement.absent_text,
            )
        )
    for index, classification in enumerate(contract.outputs.classifications):
        probabilities = np.asarray(
            result.outputs[classification.tensor].data, dtype=np.float64
        ).ravel()
        if not np.all(np.isfinite(probabilities)):
            raise OutputConversionError(
                f"output {classification.tensor!r} of model {result.model_name} holds a "
                "value that is not a number"
            )
        if np.any(probabilities < -_PROBABILITY_SLACK) or np.any(
            probabilities > 1 + _PROBABILITY_SLACK
        ):
            raise OutputConversionError(
                f"output {classification.tensor!r} of model {result.model_name} holds a value "
                f"outside 0..1; contract {contract.name} outputs.classifications[{index}] "
                "declares one probability per class"
            )
        probabilities = np.clip(probabilities, 0.0, 1.0)
        best = int(probabilities.argmax())
        found.append(
            Classification(
                code=classification.code,
                value=classification.classes[best].code,
                probability=float(probabilities[best]),
                body_site=classification.body_site,
            )
        )
    return found


def _fits(actual: Sequence[int], declared: Sequence[int | str], slices: int) -> bool:
    if len(actual) != len(declared):
        return False
    for size, expected in zip(actual, declared, strict=True):
        wanted = slices if expected == "slices" else int(expected)
        if wanted not in (-1, size):
            return False
    return True


def _shown(declared: Sequence[int | str], slices: int) -> str:
    return "[" + ", ".join(f"slices={slices}" if d == "slices" else str(d) for d in declared) + "]"


def study_reference(study_instance_uid: str) -> dict[str, Any]:
    """A logical reference to an ImagingStudy by its Study Instance UID."""
    return {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_instance_uid}"},
    }


def report_bundle(
    found: Sequence[Finding],
    *,
    study_instance_uid: str,
    device: Mapping[str, Any],
    report_code: Coding,
    series_instance_uid: str | None = None,
    slices: int = 1,
    issued: dt.datetime | None = None,
) -> dict[str, Any]:
    """A transaction Bundle: one Observation per finding and the DiagnosticReport over them.

    ``device`` is a FHIR Reference to the model's Device (for instance a logical reference by
    identifier from the OMI registry); ``report_code`` is the contract's. Entries reference each
    other by ``urn:uuid`` so the receiving server assigns ids.
    """
    when = (issued or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    study = study_reference(study_instance_uid)
    where = f"over {slices} slices of series {series_instance_uid}" if series_instance_uid else ""
    entries: list[dict[str, Any]] = []
    result_refs: list[dict[str, Any]] = []
    for finding in found:
        full_url = f"urn:uuid:{uuid.uuid4()}"
        result_refs.append({"reference": full_url})
        observation = _observation(finding, study, device, when)
        if where:
            observation["note"] = [{"text": f"Measured {where}."}]
        entries.append(
            {
                "fullUrl": full_url,
                "resource": observation,
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [
            {"coding": [{"system": _REPORT_CATEGORY, "code": "RAD", "display": "Radiology"}]}
        ],
        "code": {"coding": [report_code.fhir()], "text": report_code.display},
        "issued": when,
        "imagingStudy": [study],
        "result": result_refs,
    }
    entries.insert(
        0,
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": report,
            "request": {"method": "POST", "url": "DiagnosticReport"},
        },
    )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _concept(coding: Coding) -> dict[str, Any]:
    return {"coding": [coding.fhir()], "text": coding.display}


def _observation(
    finding: Finding, study: Mapping[str, Any], device: Mapping[str, Any], issued: str
) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {"coding": [{"system": _OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}
        ],
        "code": _concept(finding.code),
        "issued": issued,
        "derivedFrom": [dict(study)],
        "device": dict(device),
    }
    if finding.body_site is not None:
        observation["bodySite"] = _concept(finding.body_site)
    if isinstance(finding, Classification):
        observation["valueCodeableConcept"] = _concept(finding.value)
        observation["component"] = [
            {"code": _concept(PROBABILITY), "valueQuantity": finding.quantity()}
        ]
    elif finding.value is None:
        observation["dataAbsentReason"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "not-applicable",
                    "display": "Not Applicable",
                }
            ],
            "text": finding.absent_text or "the model returned no value",
        }
    else:
        observation["valueQuantity"] = finding.quantity()
    return observation


def measurements_from_bundle(bundle: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Read back ``{code: {"value": v, "unit": u}}`` from a :func:`report_bundle` Bundle: the
    value of a measurement (None when absent), or the class code of a classification with its
    probability (``"probability": p``)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") != "Observation":
            continue
        codings = resource.get("code", {}).get("coding") or []
        if not codings:
            continue
        code = str(codings[0]["code"])
        concept = resource.get("valueCodeableConcept")
        if concept is not None:
            probability = resource["component"][0]["valueQuantity"]
            found[code] = {
                "value": concept["coding"][0]["code"],
                "probability": probability.get("value"),
            }
            continue
        quantity = resource.get("valueQuantity")
        found[code] = {
            "value": None if quantity is None else quantity.get("value"),
            "unit": None if quantity is None else quantity.get("code"),
        }
    return found
