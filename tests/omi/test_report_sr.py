"""The DICOM SR measurement report (TID 1500) next to the SEG: from real MLServer through
infer_study, stored in and read back from real Orthanc, loaded with highdicom; absent values
and measurements without a segment left out; a SEG of another contract refused."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator

import highdicom as hd
import pytest
import structlog
from pydicom.dataset import Dataset

from dsf_bridge.logs import configure_logging
from dsf_bridge.omi.contract import InferenceContract, resolve_contract
from dsf_bridge.omi.conversion import ImageConversionError, Measurement, volume_from_datasets
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.execution import infer_study
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.omi.report_sr import COMPREHENSIVE_3D_SR, measurement_report, reports_segments
from dsf_bridge.omi.segmentation import segmentation_dataset
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.refmodel import tissue_labels
from tests.components import REFERENCE_MODEL

TISSUE = resolve_contract("tissue-composition")
DEVICE = {"reference": "Device/tissue-composition", "type": "Device"}
SYSTEM = "http://dsf-bridge.dev/fhir/CodeSystem/omi-measurement"


def _groups(sr: Dataset) -> dict[str, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    document = hd.sr.Comprehensive3DSR.from_dataset(sr)
    report = document.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    return {str(group.tracking_identifier): group for group in groups}


def _measured(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> dict[str, tuple[str, float, str]]:
    return {
        m.name.value: (m.name.scheme_designator, float(m.value), m.unit.value)
        for m in group.get_measurements()
    }


def _segment_of(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> Dataset:
    """The group's Referenced Segment: the SEG instance and segment number."""
    assert group.referenced_segment is not None
    [reference] = group.referenced_segment[0].ReferencedSOPSequence
    assert isinstance(reference, Dataset)
    return reference


def _source_series(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> str:
    """The group's Source Series for Segmentation (UIDREF)."""
    assert group.referenced_segment is not None
    return str(group.referenced_segment[1].UID)


@pytest.fixture
async def archive(orthanc: OrthancProcess) -> AsyncIterator[DicomWebArchive]:
    client = DicomWebArchive(
        orthanc.dicomweb_url, timeout=10.0, retry=RetryPolicy(attempts=2, initial_delay=0.05)
    )
    try:
        yield client
    finally:
        client.close()


async def test_sr_from_mlserver_is_stored_with_the_seg_and_loads_in_highdicom(
    archive: DicomWebArchive, mlserver: MLServerProcess, ct_series: list[Dataset]
) -> None:
    await archive.store(ct_series)
    study = str(ct_series[0].StudyInstanceUID)
    source_series = str(ct_series[0].SeriesInstanceUID)
    async with HttpInferenceClient(mlserver.base_url, timeout=30.0) as client:
        outcome = await infer_study(
            archive,
            client,
            study_instance_uid=study,
            contract=TISSUE,
            model=REFERENCE_MODEL.name,
            device=DEVICE,
            segmentation=True,
        )
    assert outcome.report_series_uid is not None
    assert outcome.segmentation_series_uid is not None
    series = {s.series_instance_uid: s for s in await archive.search_series(study)}
    report = series[outcome.report_series_uid]
    assert (report.modality, report.instance_count) == ("SR", 1)
    [seg] = await archive.retrieve_series(study, outcome.segmentation_series_uid)
    [sr] = await archive.retrieve_series(study, outcome.report_series_uid)

    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == study
    assert len({outcome.report_series_uid, outcome.segmentation_series_uid, source_series}) == 3
    # Patient and study attributes: the SEG's, which are the source's.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
        assert sr.get(keyword) == seg.get(keyword), keyword
    assert sr.PatientID == ct_series[0].PatientID
    assert not {"OtherPatientIDs", "PatientAddress", "PatientAge"} & set(sr.dir())
    evidence = {
        str(item.SeriesInstanceUID): len(item.ReferencedSOPSequence)
        for item in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert evidence == {outcome.segmentation_series_uid: 1, source_series: 5}

    # One group per segment with measurements; the body's measurements name no segment.
    groups = _groups(sr)
    segment_names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert sorted(groups) == sorted(segment_names.values())
    found = {f.code.code: f for f in outcome.findings if isinstance(f, Measurement)}
    by_segment = {m.code.code: m.segment for m in TISSUE.outputs.measurements}
    [label_map] = TISSUE.outputs.label_maps
    for segment in label_map.segments:
        group = groups[segment.name]
        reference = _segment_of(group)
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert segment_names[int(reference.ReferencedSegmentNumber)] == segment.name
        assert _source_series(group) == source_series
        assert group.finding_type is not None
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (
            segment.type.code,
            "99DSFB",
        )
        expected = {
            code: finding
            for code, finding in found.items()
            if by_segment[code] == segment.label and finding.value is not None
        }
        assert len(expected) == 3  # area, volume, mean attenuation of a five-slice series
        measured = _measured(group)
        assert {code: (scheme, unit) for code, (scheme, _, unit) in measured.items()} == {
            code: ("99DSFB", finding.unit) for code, finding in expected.items()
        }
        assert {code: value for code, (_, value, _) in measured.items()} == pytest.approx(
            {code: finding.value for code, finding in expected.items()}, rel=1e-9
        )
    assert "body-area" not in str(sr.ContentSequence)


def _seg_and_findings(
    ct_series: list[Dataset], contract: InferenceContract = TISSUE
) -> tuple[Dataset, list[Measurement]]:
    volume = volume_from_datasets(ct_series, contract)
    seg = segmentation_dataset(
        volume,
        ct_series,
        tissue_labels(volume.pixels),
        algorithm_name="tissue-composition",
        segments=contract.outputs.label_maps[0].segments,
    )
    found = [
        Measurement(code=m.code, value=float(index), unit=m.unit, unit_text=m.unit_text)
        for index, m in enumerate(contract.outputs.measurements, 1)
    ]
    return seg, found


def test_absent_values_are_left_out_and_no_values_make_no_report(
    ct_series: list[Dataset],
) -> None:
    seg, found = _seg_and_findings(ct_series)
    air = {"air-area", "air-volume", "air-mean-hu"}
    with_gaps = [
        Measurement(code=f.code, value=None, unit=f.unit) if f.code.code in air else f
        for f in found
    ]
    with_gaps = [
        Measurement(code=f.code, value=None, unit=f.unit) if f.code.code == "bone-mean-hu" else f
        for f in with_gaps
    ]
    sr = measurement_report(
        seg,
        ct_series,
        with_gaps,
        TISSUE,
        algorithm_name="tissue-composition",
        algorithm_version="2",
    )
    assert sr is not None
    groups = _groups(sr)
    assert sorted(groups) == ["Adipose tissue", "Bone", "Skeletal muscle"]
    assert sorted(_measured(groups["Bone"])) == ["bone-area", "bone-volume"]
    assert _measured(groups["Skeletal muscle"])["muscle-mean-hu"] == ("99DSFB", 9.0, "[hnsf'U]")
    segment_only = [f for f in found if f.code.code.startswith("body-")]
    assert (
        measurement_report(
            seg, ct_series, segment_only, TISSUE, algorithm_name="t", algorithm_version="1"
        )
        is None
    )


def test_a_name_of_one_component_is_kept_and_stays_out_of_warnings(
    ct_series: list[Dataset],
) -> None:
    """highdicom warns about a PatientName without a caret, naming it: a warning is an error
    in these tests, and in production it would put the name into the log."""
    seg, found = _seg_and_findings(ct_series)
    seg.PatientName = "Pseudonym"
    pixels = seg.PixelData
    sr = measurement_report(
        seg, ct_series, found, TISSUE, algorithm_name="t", algorithm_version="1"
    )
    assert sr is not None
    assert sr.PatientName == seg.PatientName == "Pseudonym"
    assert seg.PixelData is pixels  # the SEG itself untouched


def test_building_an_sr_logs_no_name_and_no_highdicom_chatter(ct_series: list[Dataset]) -> None:
    seg, found = _seg_and_findings(ct_series)
    seg.PatientName = "Doe"
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        sr = measurement_report(
            seg, ct_series, found, TISSUE, algorithm_name="t", algorithm_version="1"
        )
        logging.getLogger("highdicom.base").warning("still heard at warning")
    finally:
        logging.captureWarnings(False)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        structlog.reset_defaults()
    assert sr is not None
    assert sr.PatientName == "Doe"
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["still heard at warning"]
    assert "Doe" not in out.getvalue()


def test_a_seg_of_another_contract_is_refused(ct_series: list[Dataset]) -> None:
    seg, found = _seg_and_findings(ct_series)
    seg.SegmentSequence[1].SegmentLabel = "Lung"
    with pytest.raises(ImageConversionError, match=r"the SEG's segment 2 is 'Lung'"):
        measurement_report(seg, ct_series, found, TISSUE, algorithm_name="t", algorithm_version="1")


def test_only_contracts_whose_measurements_name_segments_report() -> None:
    assert reports_segments(TISSUE)
    unnamed = TISSUE.model_copy(
        update={
            "outputs": TISSUE.outputs.model_copy(
                update={
                    "measurements": [
                        m.model_copy(update={"segment": None}) for m in TISSUE.outputs.measurements
                    ]
                }
            )
        }
    )
    assert unnamed.outputs.label_maps
    assert not reports_segments(unnamed)
