"""A model's measurements of its label map's segments as a DICOM SR measurement report
(Comprehensive 3D SR, TID 1500), to store beside the SEG it refers to.

One measurement group (TID 1411, volumetric ROI) per SEG segment that the contract's
measurements name (``outputs.measurements[].segment``) and that has a value: it references the
segment in the SEG and the SEG's source series, and holds the measurements with the contract's
codes (a FHIR system becomes its DICOM coding scheme designator) and UCUM units. Measurements
without a segment, absent values and classifications stay out: they are in the FHIR result.

The SR belongs to the study of the SEG, in a new series; its patient and study attributes are
the SEG's (which repeats its source images'), nothing more. Built with highdicom.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from dsf_bridge.omi.contract import (
    Coding,
    InferenceContract,
    Segment,
    dicom_scheme,
    has_dicom_scheme,
)
from dsf_bridge.omi.conversion import Finding, ImageConversionError, Measurement

if TYPE_CHECKING:
    import highdicom as hd

__all__ = ["COMPREHENSIVE_3D_SR", "measurement_report", "reports_segments"]

COMPREHENSIVE_3D_SR = Comprehensive3DSRStorage
_UCUM = "UCUM"


def reports_segments(contract: InferenceContract) -> bool:
    """Whether a SEG of this contract gets a measurement report: a label map, and at least one
    measurement that names one of its segments."""
    return bool(contract.outputs.label_maps) and any(
        m.segment is not None for m in contract.outputs.measurements
    )


def measurement_report(
    seg: Dataset,
    source_datasets: Sequence[Dataset],
    findings: Sequence[Finding],
    contract: InferenceContract,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 901,
) -> Dataset | None:
    """The TID 1500 report of ``findings`` on the segments of ``seg`` (made by
    :func:`~dsf_bridge.omi.segmentation.segmentation_dataset` from the contract's first label
    map, from ``source_datasets``). None when no measurement of a segment has a value."""
    # Imported here: highdicom takes about a second to import, which every command that loads
    # the inference plugin would pay, and only a provider making a SEG needs it.
    import highdicom as hd  # noqa: PLC0415

    if not contract.outputs.label_maps:
        raise ImageConversionError(f"service contract {contract.name} declares no label map")
    segments = contract.outputs.label_maps[0].segments
    numbers = _segment_numbers(seg, segments)
    by_code = {(m.code.system, m.code.code): m.segment for m in contract.outputs.measurements}
    measured: dict[int, list[hd.sr.Measurement]] = {}
    for finding in findings:
        if not isinstance(finding, Measurement) or finding.value is None:
            continue
        label = by_code.get((finding.code.system, finding.code.code))
        if label is None:
            continue
        measured.setdefault(label, []).append(
            hd.sr.Measurement(
                name=_concept(finding.code),
                value=finding.value,
                unit=hd.sr.CodedConcept(finding.unit, _UCUM, finding.unit_text or finding.unit),
            )
        )
    if not measured:
        return None

    source_series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    groups = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=segment.name
            ),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID),
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=numbers[segment.label],
                source_series=hd.sr.SourceSeriesForSegmentation(source_series),
            ),
            finding_category=_concept(segment.category),
            finding_type=_concept(segment.type),
            algorithm_id=algorithm,
            measurements=measured[segment.label],
        )
        for segment in segments
        if segment.label in measured
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # The same device UID for the same model and version, report after report.
            uid=generate_uid(entropy_srcs=["dsf-bridge", algorithm_name, algorithm_version]),
            name=algorithm_name[:64],
            manufacturer_name="dsf-bridge",
            model_name=algorithm_name[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure(contract.report_code),
        imaging_measurements=groups,
    )
    # The SEG first: the SR takes its patient and study attributes from the first evidence.
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[_without_patient_name(seg), *source_datasets],
            content=report,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="dsf-bridge",
            is_complete=True,
            series_description=f"{algorithm_name} measurements"[:64],
        )
    except ValueError as exc:
        raise ImageConversionError(f"the DICOM SR could not be built: {exc}") from exc
    sr.PatientName = seg.get("PatientName", "")
    dataset: Dataset = sr
    return dataset


def _without_patient_name(seg: Dataset) -> Dataset:
    """The SEG's attributes but its pixels, with an empty PatientName: highdicom warns about a
    name of one component (``Doe``, a pseudonym) and puts the name into the warning, which
    would land in the log. The SR gets the SEG's name back once built."""
    header = Dataset()
    for element in seg:
        if element.keyword not in ("PixelData", "PatientName"):
            # Copies: highdicom sets attributes of what it takes over, and the SEG is stored too.
            header.add(copy.deepcopy(element))
    header.PatientName = ""
    return header


def _segment_numbers(seg: Dataset, segments: Sequence[Segment]) -> dict[int, int]:
    """SEG segment number by contract label: the SEG numbers the label map's segments in the
    contract's order; a SEG whose segments are not the contract's is refused."""
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    numbers: dict[int, int] = {}
    for number, segment in enumerate(segments, 1):
        if labels.get(number) != segment.name:
            raise ImageConversionError(
                f"the SEG's segment {number} is {labels.get(number)!r}, the contract's "
                f"label {segment.label} is {segment.name!r}: the SEG is not of this contract"
            )
        numbers[segment.label] = number
    return numbers


def _concept(coding: Coding) -> hd.sr.CodedConcept:
    import highdicom as hd  # noqa: PLC0415 - as in measurement_report

    return hd.sr.CodedConcept(coding.code, dicom_scheme(coding.system), coding.display[:64])


def _procedure(coding: Coding) -> hd.sr.CodedConcept:
    if has_dicom_scheme(coding.system):
        return _concept(coding)
    # SNOMED CT "Imaging procedure": the report code has no DICOM coding scheme designator.
    return _concept(Coding(system="SCT", code="363679005", display="Imaging procedure"))
