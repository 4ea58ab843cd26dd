"""Pixels to tensors and model outputs to FHIR, and the whole adapter chain with real peers:
STOW-RS into Orthanc, QIDO-RS and WADO-RS back, conversion, inference on MLServer, FHIR R4."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dsf_bridge.omi.contract import Coding, RequestNotAcceptedError, resolve_contract
from dsf_bridge.omi.conversion import (
    MEASUREMENT_CODE_SYSTEM,
    ImageConversionError,
    Measurement,
    OutputConversionError,
    findings,
    measurements_from_bundle,
    model_inputs,
    report_bundle,
    volume_from_datasets,
)
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.inference import HttpInferenceClient, InferenceResult, Tensor
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.refmodel import TISSUES, tissue_composition
from tests.components import REFERENCE_MODEL
from tests.omi.data import CT_SMALL_PATIENT_VALUES, load_ct_small
from tests.omi.test_refmodel import REFERENCE_AREAS_CM2, REFERENCE_MUSCLE_MEAN_HU

DEVICE = {
    "type": "Device",
    "identifier": {
        "system": "http://omi.de/fhir/registry/sid/device",
        "value": "tissue-composition",
    },
}


TISSUE = resolve_contract("tissue-composition")


def test_the_shipped_contract_declares_what_the_reference_model_returns() -> None:
    declared = [m.tensor for m in TISSUE.outputs.measurements]
    assert declared == [
        f"{tissue}_{quantity}"
        for tissue in TISSUES
        for quantity in ("area_cm2", "volume_ml", "mean_hu")
    ]
    assert [m.tensor for m in TISSUE.outputs.label_maps] == ["tissue_labels"]
    assert TISSUE.accepts.modality == ["CT"]


def test_ct_small_to_volume(ct_small: Dataset) -> None:
    volume = volume_from_datasets([ct_small], TISSUE)
    assert volume.pixels.shape == (1, 128, 128)
    assert volume.pixels.dtype == np.float32
    assert volume.spacing_mm == pytest.approx((5.0, 0.661468, 0.661468))
    assert float(volume.pixels.min()) == float(ct_small.pixel_array.min()) - 1024
    assert volume.study_instance_uid == ct_small.StudyInstanceUID
    tensors = {t.name: t for t in model_inputs(volume, TISSUE)}
    assert tensors["hu"].datatype == "FP32"
    assert tensors["spacing_mm"].shape == (3,)


def test_series_is_ordered_by_position_with_spacing_from_positions(
    ct_series: list[Dataset],
) -> None:
    shuffled = [ct_series[i] for i in (3, 0, 4, 1, 2)]
    volume = volume_from_datasets(shuffled, TISSUE)
    # Positions fall by 5 mm per instance number, so ascending position is reverse order.
    assert volume.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in ct_series[::-1])
    assert volume.spacing_mm[0] == pytest.approx(5.0)
    np.testing.assert_array_equal(volume.pixels[-1], ct_series[0].pixel_array - 1024.0)


def test_rescale_slope_and_intercept_are_applied(ct_small: Dataset) -> None:
    ds = copy.deepcopy(ct_small)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
    volume = volume_from_datasets([ds], TISSUE)
    np.testing.assert_array_equal(volume.pixels[0], ct_small.pixel_array * 2.0 - 2048)


def test_the_largest_series_is_taken_unless_one_is_named(
    ct_small: Dataset, ct_series: list[Dataset]
) -> None:
    assert volume_from_datasets([ct_small, *ct_series], TISSUE).slices == 5
    named = volume_from_datasets(
        [ct_small, *ct_series], TISSUE, series_instance_uid=str(ct_small.SeriesInstanceUID)
    )
    assert named.slices == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"PixelSpacing": None}, "no PixelSpacing"),
        ({"NumberOfFrames": 2}, "multi-frame"),
    ],
)
def test_images_that_cannot_feed_the_model(
    ct_small: Dataset, change: dict[str, Any], message: str
) -> None:
    ds = copy.deepcopy(ct_small)
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with pytest.raises(ImageConversionError, match=message):
        volume_from_datasets([ds], TISSUE)


def test_pixel_data_that_cannot_be_decoded_is_a_conversion_error() -> None:
    # pydicom raises NotImplementedError here; in a consortium cohort anything but a
    # conversion error would end the whole site's run (and it would never answer).
    ds = load_ct_small()  # its own copy: the session's may hold its decoded pixels
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    with pytest.raises(ImageConversionError, match="cannot be decoded") as info:
        volume_from_datasets([ds], TISSUE)
    assert str(ds.SOPInstanceUID) not in str(info.value)


def test_a_series_the_contract_does_not_accept_is_refused_naming_field_and_values(
    ct_small: Dataset,
) -> None:
    ds = copy.deepcopy(ct_small)
    ds.Modality = "MR"
    with pytest.raises(
        RequestNotAcceptedError,
        match=r"service contract tissue-composition: accepts\.modality is CT, the series is MR",
    ):
        volume_from_datasets([ds], TISSUE)


def test_duplicate_slice_positions_are_refused(ct_series: list[Dataset]) -> None:
    twin = copy.deepcopy(ct_series[1])
    twin.ImagePositionPatient = ct_series[0].ImagePositionPatient
    with pytest.raises(ImageConversionError, match="same position"):
        volume_from_datasets([ct_series[0], twin], TISSUE)


def _fake_result(hu: np.ndarray, spacing: tuple[float, float, float]) -> InferenceResult:
    composition = tissue_composition(hu, spacing)
    outputs = {}
    for column, tissue in enumerate(TISSUES):
        for name, values in (
            (f"{tissue}_area_cm2", composition.area_cm2[:, column]),
            (f"{tissue}_volume_ml", composition.volume_ml[column : column + 1]),
            (f"{tissue}_mean_hu", composition.mean_hu[column : column + 1]),
        ):
            outputs[name] = Tensor.of(name, values, "FP64")
    return InferenceResult("tissue-composition", "1", None, outputs)


def _validate(bundle: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate with the R4B models; return the report and observations as plain JSON."""
    Bundle.model_validate(bundle)
    resources = [entry["resource"] for entry in bundle["entry"]]
    reports = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    for report in reports:
        DiagnosticReport.model_validate(report)
    for observation in observations:
        Observation.model_validate(observation)
    assert len(reports) == 1
    return reports[0], observations


def test_single_slice_report_is_valid_fhir(ct_small: Dataset) -> None:
    volume = volume_from_datasets([ct_small], TISSUE)
    measurements = findings(
        _fake_result(volume.pixels, volume.spacing_mm), TISSUE, slices=volume.slices
    )
    bundle = report_bundle(
        measurements,
        study_instance_uid=volume.study_instance_uid,
        device=DEVICE,
        report_code=TISSUE.report_code,
        issued=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    )
    report, observations = _validate(bundle)
    assert len(observations) == 10  # area and mean HU of five tissues; no volume for one slice
    assert [ref["reference"] for ref in report["result"]] == [
        entry["fullUrl"] for entry in bundle["entry"][1:]
    ]
    study = {"system": "urn:dicom:uid", "value": f"urn:oid:{ct_small.StudyInstanceUID}"}
    assert report["imagingStudy"][0]["identifier"] == study
    assert report["issued"] == "2026-01-02T03:04:05+00:00"
    for observation in observations:
        assert observation["derivedFrom"][0]["identifier"] == study
        assert observation["device"] == DEVICE
        assert "subject" not in observation
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    muscle = by_code["muscle-area"]["valueQuantity"]
    assert muscle["value"] == pytest.approx(29.60, abs=0.01)
    assert (muscle["unit"], muscle["system"], muscle["code"]) == (
        "cm2",
        "http://unitsofmeasure.org",
        "cm2",
    )
    assert by_code["muscle-mean-hu"]["valueQuantity"]["code"] == "[hnsf'U]"


def test_no_patient_identifier_reaches_the_report(ct_small: Dataset) -> None:
    volume = volume_from_datasets([ct_small], TISSUE)
    bundle = report_bundle(
        findings(_fake_result(volume.pixels, volume.spacing_mm), TISSUE, slices=1),
        study_instance_uid=volume.study_instance_uid,
        device=DEVICE,
        report_code=TISSUE.report_code,
    )
    text = json.dumps(bundle)
    for value in CT_SMALL_PATIENT_VALUES:
        assert value not in text
    assert '"Patient' not in text
    assert "subject" not in text
    assert "birth" not in text.lower()


def test_series_report_has_volumes_and_mean_areas(ct_series: list[Dataset]) -> None:
    volume = volume_from_datasets(ct_series, TISSUE)
    result = _fake_result(volume.pixels, volume.spacing_mm)
    measurements = findings(result, TISSUE, slices=5)
    bundle = report_bundle(
        measurements,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        slices=5,
        device=DEVICE,
        report_code=TISSUE.report_code,
    )
    _, observations = _validate(bundle)
    assert len(observations) == 15
    values = measurements_from_bundle(bundle)
    body_areas = result["body_area_cm2"].data
    assert values["body-area"]["value"] == pytest.approx(float(body_areas.mean()), abs=1e-4)
    assert values["body-volume"] == {
        "value": pytest.approx(float(body_areas.sum()) * 0.5, abs=1e-4),
        "unit": "mL",
    }
    assert "over 5 slices" in observations[0]["note"][0]["text"]


def test_absent_tissue_is_reported_as_absent() -> None:
    bundle = report_bundle(
        [
            Measurement(
                code=Coding(system=MEASUREMENT_CODE_SYSTEM, code="bone-mean-hu", display="Bone"),
                value=None,
                unit="[hnsf'U]",
                absent_text="no bone found",
            )
        ],
        study_instance_uid="1.2.3",
        device=DEVICE,
        report_code=TISSUE.report_code,
    )
    _, [observation] = _validate(bundle)
    assert "valueQuantity" not in observation
    assert observation["dataAbsentReason"]["coding"][0]["code"] == "not-applicable"
    assert observation["dataAbsentReason"]["text"] == "no bone found"


def test_missing_or_misshapen_outputs_are_refused(ct_small: Dataset) -> None:
    volume = volume_from_datasets([ct_small], TISSUE)
    result = _fake_result(volume.pixels, volume.spacing_mm)
    with pytest.raises(
        OutputConversionError,
        match=r"output 'body_area_cm2' of model tissue-composition has shape \[1\]; contract "
        r"tissue-composition outputs.measurements\[0\].shape is \[slices=2\]",
    ):
        findings(result, TISSUE, slices=2)
    partial = InferenceResult(
        result.model_name, None, None, {k: v for k, v in result.outputs.items() if "bone" not in k}
    )
    with pytest.raises(
        OutputConversionError,
        match=r"returned no output 'bone_area_cm2' \(contract tissue-composition "
        r"outputs.measurements\[3\].tensor\)",
    ):
        findings(partial, TISSUE, slices=1)


# --- the chain with real peers ---------------------------------------------------------------


@pytest.fixture
async def archive(orthanc: OrthancProcess) -> AsyncIterator[DicomWebArchive]:
    client = DicomWebArchive(
        orthanc.dicomweb_url, timeout=10.0, retry=RetryPolicy(attempts=2, initial_delay=0.05)
    )
    try:
        yield client
    finally:
        client.close()


async def _run_chain(
    archive: DicomWebArchive, mlserver: MLServerProcess, study_uid: str
) -> tuple[dict[str, Any], int]:
    datasets = await archive.retrieve_study(study_uid)
    volume = volume_from_datasets(datasets, TISSUE)
    async with HttpInferenceClient(mlserver.base_url, timeout=30.0) as client:
        await client.ensure_model_ready(REFERENCE_MODEL.name)
        result = await client.infer(REFERENCE_MODEL.name, model_inputs(volume, TISSUE))
    bundle = report_bundle(
        findings(result, TISSUE, slices=volume.slices),
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid if volume.slices > 1 else None,
        slices=volume.slices,
        device=DEVICE,
        report_code=TISSUE.report_code,
    )
    _validate(bundle)
    return measurements_from_bundle(bundle), volume.slices


async def test_ct_small_through_orthanc_and_mlserver(
    archive: DicomWebArchive, mlserver: MLServerProcess, ct_small: Dataset
) -> None:
    await archive.store([ct_small])
    values, slices = await _run_chain(archive, mlserver, str(ct_small.StudyInstanceUID))
    assert slices == 1
    for tissue, expected in REFERENCE_AREAS_CM2.items():
        assert values[f"{tissue}-area"]["unit"] == "cm2"
        assert values[f"{tissue}-area"]["value"] == pytest.approx(expected, abs=0.01), tissue
    assert values["muscle-mean-hu"]["value"] == pytest.approx(REFERENCE_MUSCLE_MEAN_HU, abs=0.05)
    assert not any(code.endswith("-volume") for code in values)


async def test_series_through_orthanc_and_mlserver(
    archive: DicomWebArchive, mlserver: MLServerProcess, ct_series: list[Dataset]
) -> None:
    await archive.store(list(reversed(ct_series)))
    values, slices = await _run_chain(archive, mlserver, str(ct_series[0].StudyInstanceUID))
    assert slices == 5
    hu = np.stack([ds.pixel_array - 1024.0 for ds in ct_series])
    expected = tissue_composition(hu, (5.0, 0.661468, 0.661468))
    for column, tissue in enumerate(TISSUES):
        assert values[f"{tissue}-volume"]["value"] == pytest.approx(
            expected.volume_ml[column], abs=0.001
        )
        assert values[f"{tissue}-area"]["value"] == pytest.approx(
            expected.area_cm2[:, column].mean(), abs=0.001
        )
    # Slice 0 of the series is CT_small's image: the reference holds per slice as well.
    assert expected.area_cm2[0, 0] == pytest.approx(REFERENCE_AREAS_CM2["body"], abs=0.01)
