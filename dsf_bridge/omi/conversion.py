"""Conversion at both ends of a model call: DICOM pixels to the model's input tensors, and the
model's outputs to FHIR R4 resources (JSON dicts).

Input side: one series of CT slices is sorted along the slice normal, converted to Hounsfield
units by RescaleSlope/RescaleIntercept and given its spacing from PixelSpacing and the distance
between slice positions (SpacingBetweenSlices, then SliceThickness when there is one slice).

Output side: one ``Observation`` per measurement (UCUM units ``cm2``, ``mL``, ``[hnsf'U]``),
grouped by a ``DiagnosticReport``; both point at the study by its Study Instance UID
(identifier system ``urn:dicom:uid``, value ``urn:oid:<uid>``) and the Observations name the
``device`` (the model) that measured. No patient attribute is ever read from the DICOM data or
written to FHIR: no subject, names, birth dates or patient IDs.

Errors: :class:`ImageConversionError` (a :class:`~dsf_bridge.errors.BridgeError`, not
retryable) when the images cannot feed the model, :class:`OutputConversionError` when the
model's outputs miss what the report needs.
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

from dsf_bridge.errors import BridgeError
from dsf_bridge.omi.inference import InferenceResult, Tensor

__all__ = [
    "COMPOSITION_OUTPUTS",
    "DICOM_UID_SYSTEM",
    "MEASUREMENT_CODE_SYSTEM",
    "TISSUES",
    "UCUM",
    "ImageConversionError",
    "ImageVolume",
    "Measurement",
    "OutputConversionError",
    "composition_measurements",
    "measurements_from_bundle",
    "report_bundle",
    "study_reference",
    "volume_from_datasets",
]

DICOM_UID_SYSTEM = "urn:dicom:uid"
UCUM = "http://unitsofmeasure.org"
# Our codes for the measurements of the reference contract; the process plugin's CodeSystem
# resource (profiles/) publishes them under this URL.
MEASUREMENT_CODE_SYSTEM = "http://dsf-bridge.dev/fhir/CodeSystem/omi-measurement"
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_REPORT_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0074"

# The tissues of the reference contract, in its order (dsf_bridge.sandbox.refmodel.TISSUES;
# a test keeps both equal, since omi may not import the sandbox).
TISSUES: tuple[str, ...] = ("body", "bone", "muscle", "adipose", "air")
# Every output of the reference contract; OIP servers return only the outputs a request names
# when it names any, so a request for an extra output names these as well.
COMPOSITION_OUTPUTS: tuple[str, ...] = tuple(
    f"{tissue}_{quantity}"
    for tissue in TISSUES
    for quantity in ("area_cm2", "volume_ml", "mean_hu")
)
_TISSUE_NAMES = {
    "body": "body",
    "bone": "bone",
    "muscle": "skeletal muscle",
    "adipose": "adipose tissue",
    "air": "air inside the body",
}
# quantity -> (UCUM code, human unit, display template)
_QUANTITIES = {
    "area_cm2": ("cm2", "cm2", "{tissue} cross-sectional area"),
    "volume_ml": ("mL", "mL", "{tissue} volume"),
    "mean_hu": ("[hnsf'U]", "HU", "{tissue} mean attenuation"),
}

_QUANTITY_CODES = {"area_cm2": "area", "volume_ml": "volume", "mean_hu": "mean-hu"}


class ImageConversionError(BridgeError):
    """The images cannot be turned into the model's input (wrong modality, missing spacing)."""

    retryable = False


class OutputConversionError(BridgeError):
    """The model's outputs lack a measurement the result needs, or carry nonsense."""

    retryable = False


@dataclass(frozen=True)
class ImageVolume:
    """One series in Hounsfield units, ordered along the slice normal, with its geometry."""

    hu: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]  # slice, row, column
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]

    @property
    def slices(self) -> int:
        return int(self.hu.shape[0])

    def to_tensors(self) -> list[Tensor]:
        """The reference contract's inputs: ``hu`` and ``spacing_mm``, both FP32."""
        return [
            Tensor.of("hu", self.hu, "FP32"),
            Tensor.of("spacing_mm", self.spacing_mm, "FP32"),
        ]


def volume_from_datasets(
    datasets: Sequence[Dataset], *, series_instance_uid: str | None = None
) -> ImageVolume:
    """Stack CT slices of one series into an :class:`ImageVolume`.

    With several series and none named, the series with the most slices is taken.
    """
    images = [ds for ds in datasets if "PixelData" in ds]
    if not images:
        raise ImageConversionError("no image with pixel data was retrieved")
    if series_instance_uid is None:
        counts = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in images)
        series_instance_uid = counts.most_common(1)[0][0]
    images = [ds for ds in images if str(ds.get("SeriesInstanceUID", "")) == series_instance_uid]
    if not images:
        raise ImageConversionError(f"no image of series {series_instance_uid} was retrieved")
    modalities = {str(ds.get("Modality", "")) for ds in images}
    if modalities != {"CT"}:
        raise ImageConversionError(
            f"Hounsfield units need CT images; series {series_instance_uid} is "
            f"{', '.join(sorted(modalities)) or 'of unknown modality'}"
        )
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in images):
        raise ImageConversionError(
            f"series {series_instance_uid} holds multi-frame images; one frame per instance "
            "(classic CT) is supported"
        )
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in images}
    if len(shapes) != 1:
        raise ImageConversionError(
            f"series {series_instance_uid} mixes image sizes {sorted(shapes)}"
        )
    row_mm, column_mm = _pixel_spacing(images[0], series_instance_uid)
    ordered, slice_mm = _order_slices(images, series_instance_uid)
    hu = np.stack([_hounsfield(ds) for ds in ordered]).astype(np.float32)
    return ImageVolume(
        hu=hu,
        spacing_mm=(slice_mm, row_mm, column_mm),
        study_instance_uid=str(ordered[0].StudyInstanceUID),
        series_instance_uid=series_instance_uid,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in ordered),
    )


def _hounsfield(ds: Dataset) -> npt.NDArray[np.float64]:
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    pixels: npt.NDArray[np.float64] = ds.pixel_array.astype(np.float64) * slope + intercept
    return pixels


def _pixel_spacing(ds: Dataset, series: str) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise ImageConversionError(f"series {series} has no PixelSpacing: areas need it")
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
    """One reported number: ``tissue`` and ``quantity`` (``area_cm2``, ``volume_ml``,
    ``mean_hu``), its value and UCUM unit; ``value`` is None when the tissue is absent."""

    tissue: str
    quantity: str
    value: float | None
    unit: str

    @property
    def code(self) -> str:
        """Its code in :data:`MEASUREMENT_CODE_SYSTEM`, e.g. ``muscle-area``."""
        return f"{self.tissue}-{_QUANTITY_CODES[self.quantity]}"


def composition_measurements(result: InferenceResult, *, slices: int) -> list[Measurement]:
    """The reference contract's outputs as measurements.

    Areas are per slice: for one slice its area, for a series the mean area per slice. Volumes
    are reported for a series only (one slice has no meaningful volume). Mean HU always.
    """
    measurements = []
    for tissue in TISSUES:
        area = _floats(result, f"{tissue}_area_cm2")
        if area.size != slices:
            raise OutputConversionError(
                f"output {tissue}_area_cm2 has {area.size} values for {slices} slices"
            )
        measurements.append(Measurement(tissue, "area_cm2", _finite(area.mean()), "cm2"))
        if slices > 1:
            volume = _floats(result, f"{tissue}_volume_ml")
            measurements.append(Measurement(tissue, "volume_ml", _finite(volume[0]), "mL"))
        mean_hu = _floats(result, f"{tissue}_mean_hu")
        measurements.append(Measurement(tissue, "mean_hu", _finite(mean_hu[0]), "[hnsf'U]"))
    return measurements


def _floats(result: InferenceResult, name: str) -> npt.NDArray[np.float64]:
    tensor = result.outputs.get(name)
    if tensor is None:
        raise OutputConversionError(f"model {result.model_name} returned no output {name!r}")
    values = np.asarray(tensor.data, dtype=np.float64).ravel()
    if values.size == 0:
        raise OutputConversionError(f"output {name!r} of model {result.model_name} is empty")
    return values


def _finite(value: float) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def study_reference(study_instance_uid: str) -> dict[str, Any]:
    """A logical reference to an ImagingStudy by its Study Instance UID."""
    return {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_instance_uid}"},
    }


def report_bundle(
    measurements: Sequence[Measurement],
    *,
    study_instance_uid: str,
    device: Mapping[str, Any],
    series_instance_uid: str | None = None,
    slices: int = 1,
    issued: dt.datetime | None = None,
    report_code: str = "tissue-composition",
    report_display: str = "CT tissue composition by Hounsfield units",
) -> dict[str, Any]:
    """A transaction Bundle: one Observation per measurement and the DiagnosticReport over them.

    ``device`` is a FHIR Reference to the model's Device (for instance a logical reference by
    identifier from the OMI registry). Entries reference each other by ``urn:uuid`` so the
    receiving server assigns ids.
    """
    when = (issued or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
    study = study_reference(study_instance_uid)
    where = f"over {slices} slices of series {series_instance_uid}" if series_instance_uid else ""
    entries: list[dict[str, Any]] = []
    result_refs: list[dict[str, Any]] = []
    for measurement in measurements:
        full_url = f"urn:uuid:{uuid.uuid4()}"
        result_refs.append({"reference": full_url})
        observation = _observation(measurement, study, device, when, slices)
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
        "code": {
            "coding": [
                {"system": MEASUREMENT_CODE_SYSTEM, "code": report_code, "display": report_display}
            ],
            "text": report_display,
        },
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


def _observation(
    measurement: Measurement,
    study: Mapping[str, Any],
    device: Mapping[str, Any],
    issued: str,
    slices: int,
) -> dict[str, Any]:
    unit_code, unit, template = _QUANTITIES[measurement.quantity]
    display = template.format(tissue=_TISSUE_NAMES[measurement.tissue]).capitalize()
    if measurement.quantity == "area_cm2":
        display += " per slice" if slices == 1 else " per slice (mean)"
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {"coding": [{"system": _OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}
        ],
        "code": {
            "coding": [
                {"system": MEASUREMENT_CODE_SYSTEM, "code": measurement.code, "display": display}
            ],
            "text": display,
        },
        "issued": issued,
        "derivedFrom": [dict(study)],
        "device": dict(device),
    }
    if measurement.value is None:
        observation["dataAbsentReason"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "not-applicable",
                    "display": "Not Applicable",
                }
            ],
            "text": f"no {_TISSUE_NAMES[measurement.tissue]} found",
        }
    else:
        observation["valueQuantity"] = {
            "value": round(measurement.value, 4),
            "unit": unit,
            "system": UCUM,
            "code": unit_code,
        }
    return observation


def measurements_from_bundle(bundle: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Read back ``{code: {"value": v, "unit": u}}`` from a :func:`report_bundle` Bundle."""
    found: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") != "Observation":
            continue
        coding = next(
            (
                c
                for c in resource.get("code", {}).get("coding", [])
                if c.get("system") == MEASUREMENT_CODE_SYSTEM
            ),
            None,
        )
        if coding is None:
            continue
        quantity = resource.get("valueQuantity")
        found[str(coding["code"])] = {
            "value": None if quantity is None else quantity.get("value"),
            "unit": None if quantity is None else quantity.get("code"),
        }
    return found
