"""Service contracts: loading (TOML, JSON, inline, shipped) with errors naming the field, the
request checks, the pixel handling a contract declares, the checks of a model's answer, and a
classification as FHIR; ``my-model`` (docs/examples/my-model.toml) through real Orthanc and
real MLServer."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation
from pydicom.dataset import Dataset

from dsf_bridge.errors import ConfigError
from dsf_bridge.omi.contract import (
    ContractError,
    InferenceContract,
    PixelHandling,
    RequestNotAcceptedError,
    Window,
    check_catalogue,
    contract_of,
    load_contract,
    resolve_contract,
)
from dsf_bridge.omi.conversion import (
    Classification,
    ImageConversionError,
    OutputConversionError,
    check_outputs,
    findings,
    measurements_from_bundle,
    model_inputs,
    report_bundle,
    volume_from_datasets,
)
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.execution import infer_study
from dsf_bridge.omi.inference import HttpInferenceClient, InferenceResult, Tensor
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.refmodel.density import shifted
from dsf_bridge.sandbox.refmodel.nodule import nodule_probability
from tests.components import DENSITY_CONTRACT, DENSITY_MODEL, NODULE_MODEL
from tests.omi.data import make_series

REPO = Path(__file__).resolve().parents[2]
MY_MODEL_FILE = REPO / "docs" / "examples" / "my-model.toml"
MY_MODEL = load_contract(MY_MODEL_FILE)
TISSUE = resolve_contract("tissue-composition")
DEVICE = {"type": "Device", "identifier": {"system": "urn:example", "value": "my-model"}}


def _raw(path: Path = MY_MODEL_FILE) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _write(tmp_path: Path, name: str, data: dict[str, Any] | str) -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))
    return path


# --- loading ---------------------------------------------------------------------------------


def test_toml_json_and_inline_give_the_same_contract(tmp_path: Path) -> None:
    as_json = _write(tmp_path, "my-model.json", MY_MODEL.model_dump(mode="json"))
    assert load_contract(as_json) == MY_MODEL
    assert contract_of(str(as_json)) == MY_MODEL
    assert contract_of(_raw()) == MY_MODEL
    assert contract_of(None) is None
    assert MY_MODEL.pixels.dimensions == 2
    assert [c.code.code for c in MY_MODEL.outputs.classifications[0].classes] == [
        "absent",
        "present",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda raw: raw["outputs"]["measurements"][0].pop("unit"),
            r"outputs\.measurements\[0\]\.unit: Field required",
        ),
        (
            lambda raw: raw["accepts"].update(modalities=["CT"]),
            r"accepts\.modalities: unknown field",
        ),
        (
            lambda raw: raw["pixels"].pop("window"),
            r"pixels: Value error, normalise = 'unit' maps the window to 0\.\.1",
        ),
        (
            lambda raw: raw["outputs"]["classifications"][0].update(tensor="nodule_probability"),
            r"outputs: Value error, tensor declared twice: nodule_probability",
        ),
        (
            lambda raw: raw["outputs"]["measurements"][0].update(datatype=["FLOAT"]),
            r"outputs\.measurements\[0\]\.datatype\[0\]: Input should be 'BOOL'",
        ),
        (
            lambda raw: raw["inputs"].update(shape=[-1, -1, -1]),
            r"contract: Value error, inputs\.shape has 3 dimensions, pixels\.dimensions is 2",
        ),
        (
            # A finding under the wire's own codes collided with the Task's slices and was
            # dropped by the requesting site as no finding.
            lambda raw: raw["outputs"]["measurements"][0]["code"].update(
                system="http://dsf-bridge.dev/fhir/CodeSystem/omi", code="slices"
            ),
            r"outputs: Value error, code http://dsf-bridge\.dev/fhir/CodeSystem/omi\|slices is "
            r"in a system the Task inputs use for the protocol itself",
        ),
        (
            lambda raw: raw["outputs"]["classifications"][0]["code"].update(
                system="http://dsf-bridge.dev/fhir/CodeSystem/omi-measurement", code="body-area"
            ),
            r"outputs: Value error, classification .*omi-measurement\|body-area: the bridge's "
            r"measurement system holds quantities",
        ),
        (
            # A window of infinite width turned every pixel into NaN, sent as the model's input.
            lambda raw: raw["pixels"]["window"].update(width=float("inf")),
            r"pixels\.window\.width: Input should be a finite number",
        ),
        (
            lambda raw: raw["pixels"]["window"].update(center=float("nan")),
            r"pixels\.window\.center: Input should be a finite number",
        ),
    ],
    ids=[
        "missing-unit",
        "unknown-key",
        "unit-without-window",
        "tensor-twice",
        "bad-dtype",
        "shape",
        "wire-system",
        "class-in-measurement-system",
        "infinite-width",
        "nan-center",
    ],
)
def test_a_bad_contract_file_names_the_file_and_the_field(
    tmp_path: Path, change: Any, message: str
) -> None:
    raw = _raw()
    change(raw)
    path = _write(tmp_path, "bad.json", raw)
    with pytest.raises(ContractError, match=f"contract file {path}: {message}"):
        load_contract(path)


_TISSUE_FILE = REPO / "dsf_bridge" / "omi" / "contracts" / "tissue-composition.toml"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda raw: raw["outputs"]["measurements"][3].update(segment=7),
            r"outputs: Value error, outputs\.measurements\[3\]\.segment is 7, a label no segment "
            r"has: outputs\.label_maps\[0\]\.segments declares 2, 3, 4, 5",
        ),
        (
            lambda raw: raw["outputs"].pop("label_maps"),
            r"outputs: Value error, outputs\.measurements\[3\]\.segment is 2, a label no segment "
            r"has: "
            r"outputs\.label_maps is empty",
        ),
        (
            lambda raw: raw["outputs"]["measurements"][3]["code"].update(
                system="https://provider.example/codes"
            ),
            r"outputs: Value error, outputs\.measurements\[3\]\.code: system "
            r"'https://provider\.example/codes' has no DICOM coding scheme designator: .* \(a "
            r"segment's measurement goes into the DICOM SR\)",
        ),
        (
            lambda raw: raw["outputs"]["measurements"][3].update(segment=0),
            r"outputs\.measurements\[3\]\.segment: Input should be greater than or equal to 1",
        ),
    ],
    ids=["undeclared-label", "no-label-map", "code-without-designator", "label-zero"],
)
def test_a_measurement_names_a_declared_segment(tmp_path: Path, change: Any, message: str) -> None:
    raw = _raw(_TISSUE_FILE)
    assert raw["outputs"]["measurements"][3]["segment"] == 2  # bone-area, of the bone segment
    change(raw)
    path = _write(tmp_path, "tissue.json", raw)
    with pytest.raises(ContractError, match=f"contract file {path}: {message}"):
        load_contract(path)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="cannot be read: No such file"):
        load_contract(tmp_path / "missing.toml")
    with pytest.raises(ContractError, match="is not valid TOML"):
        load_contract(_write(tmp_path, "bad.toml", "name = "))
    with pytest.raises(ContractError, match="neither a shipped contract"):
        resolve_contract("no-such-contract")


def test_the_catalogue_check_names_the_entry(tmp_path: Path) -> None:
    raw = _raw()
    del raw["model"]
    with pytest.raises(ConfigError, match=r"omi\.catalogue\.1\.contract: inline contract: model:"):
        check_catalogue(["tissue-composition", raw])
    check_catalogue([None, "tissue-composition", str(MY_MODEL_FILE), _raw()])


def test_the_cli_refuses_to_start_with_a_bad_contract(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[[omi.catalogue]]\nid = "my-model"\ninference_url = "http://127.0.0.1:9"\n'
        f'contract = "{tmp_path / "absent.toml"}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "dsf_bridge", "config", "show", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "configuration error: omi.catalogue.0.contract: contract file" in done.stderr
    assert "absent.toml cannot be read" in done.stderr


# --- requests against the contract ----------------------------------------------------------


def test_series_checks_name_the_field_and_both_values() -> None:
    contract = MY_MODEL.model_copy(
        update={"accepts": MY_MODEL.accepts.model_copy(update={"body_part": ["CHEST"]})}
    )
    with pytest.raises(
        RequestNotAcceptedError,
        match=r"service contract my-model: accepts\.modality is CT, the series is MR",
    ):
        contract.check_series(modalities=["MR"])
    with pytest.raises(
        RequestNotAcceptedError, match=r"accepts\.body_part is CHEST, the series is HEAD"
    ):
        contract.check_series(modalities=["ct"], body_parts=["head"])
    with pytest.raises(
        RequestNotAcceptedError, match=r"accepts\.max_slices is 1, the series has 5"
    ):
        contract.check_series(modalities=["CT"], slices=5)
    contract.check_series(modalities=["CT"], body_parts=["", "chest"], slices=1)
    with pytest.raises(
        RequestNotAcceptedError,
        match=r"pixels\.dimensions is 2 \(one slice\), the series has 3 slices",
    ):
        MY_MODEL.model_copy(
            update={"accepts": MY_MODEL.accepts.model_copy(update={"max_slices": None})}
        ).check_series(modalities=["CT"], slices=3)
    named = TISSUE.model_copy(
        update={"accepts": TISSUE.accepts.model_copy(update={"series": "named"})}
    )
    with pytest.raises(RequestNotAcceptedError, match=r"accepts\.series is 'named'"):
        named.check_series(modalities=["CT"], series_named=False)


def test_a_series_too_long_for_a_2d_contract_is_refused(ct_series: list[Dataset]) -> None:
    with pytest.raises(
        RequestNotAcceptedError, match=r"accepts\.max_slices is 1, the series has 5"
    ):
        volume_from_datasets(ct_series, MY_MODEL)


# --- pixel handling --------------------------------------------------------------------------


def test_window_and_unit_normalisation_in_two_dimensions(ct_small: Dataset) -> None:
    volume = volume_from_datasets([ct_small], MY_MODEL)
    [image] = model_inputs(volume, MY_MODEL)
    hu = ct_small.pixel_array.astype(np.float64) * float(ct_small.RescaleSlope) + float(
        ct_small.RescaleIntercept
    )
    expected = (np.clip(hu, -1350.0, 150.0) + 1350.0) / 1500.0
    assert (image.name, image.datatype, image.shape) == ("image", "FP32", (128, 128))
    np.testing.assert_allclose(image.data, expected, atol=1e-6)


def test_spacing_is_needed_only_by_a_contract_that_uses_it(ct_small: Dataset) -> None:
    ds = copy.deepcopy(ct_small)
    del ds.PixelSpacing
    [image] = model_inputs(volume_from_datasets([ds], MY_MODEL), MY_MODEL)
    assert image.shape == (128, 128)
    with pytest.raises(Exception, match="has no PixelSpacing: the contract needs it"):
        volume_from_datasets([ds], TISSUE)


def test_raw_values_resampling_zscore_and_integer_datatype(ct_small: Dataset) -> None:
    contract = TISSUE.model_copy(
        update={
            "pixels": TISSUE.pixels.model_copy(
                update={
                    "values": "raw",
                    "resample_mm": [1.0, 2.0],
                    "normalise": "zscore",
                    "datatype": "INT16",
                }
            ),
            "inputs": TISSUE.inputs.model_copy(update={"shape": ["slices", 85, 42]}),
        }
    )
    volume = volume_from_datasets([ct_small], contract)
    np.testing.assert_array_equal(volume.pixels[0], ct_small.pixel_array)  # no rescale
    image, spacing = model_inputs(volume, contract)
    # 128 pixels of 0.661468 mm resampled to 1 mm rows and 2 mm columns.
    assert image.shape == (1, 85, 42)
    assert image.datatype == "INT16"
    assert abs(float(image.data.mean())) < 0.5  # zero mean, rounded to integers
    assert spacing.data.tolist() == pytest.approx([5.0, 1.0, 2.0])
    wrong = contract.model_copy(
        update={"inputs": contract.inputs.model_copy(update={"shape": ["slices", 128, 128]})}
    )
    with pytest.raises(Exception, match=r"inputs\.shape is \[slices=1, 128, 128\]"):
        model_inputs(volume, wrong)


def test_a_fine_resampling_is_refused_before_its_image_is_made(ct_small: Dataset) -> None:
    """128 x 128 pixels of 0.66 mm resampled to 0.01 mm would be 8,467 x 8,467 FP32 values
    (287 MB): refused by its size, computed from shape and spacing, naming the limit."""
    contract = TISSUE.model_copy(
        update={
            "pixels": TISSUE.pixels.model_copy(update={"resample_mm": [0.01, 0.01]}),
            "inputs": TISSUE.inputs.model_copy(update={"shape": None}),
        }
    )
    volume = volume_from_datasets([ct_small], contract)
    with pytest.raises(RequestNotAcceptedError) as refused:
        model_inputs(volume, contract, max_bytes=64 << 20)
    assert "1x8467x8467 image (resampled to [0.01, 0.01] mm) of 286,760,356 bytes as FP32" in str(
        refused.value
    )
    assert "more than the limit of 67,108,864 bytes per request" in str(refused.value)
    # The same series at its own spacing stays far below the limit.
    [image] = model_inputs(volume, MY_MODEL, max_bytes=64 << 20)
    assert image.shape == (128, 128)


def test_pixel_values_an_integer_datatype_cannot_hold_are_refused(ct_small: Dataset) -> None:
    # Hounsfield units as UINT8 wrapped around silently: -849 HU reached the model as 175.
    contract = MY_MODEL.model_copy(
        update={"pixels": PixelHandling(values="hounsfield", dimensions=2, datatype="UINT8")}
    )
    volume = volume_from_datasets([ct_small], contract)
    with pytest.raises(
        ImageConversionError,
        match=r"pixel values -896\.\.1167 do not fit contract my-model pixels\.datatype UINT8 "
        r"\(0\.\.255\)",
    ):
        model_inputs(volume, contract)
    windowed = contract.model_copy(
        update={
            "pixels": PixelHandling(
                values="hounsfield",
                dimensions=2,
                window=Window(center=40, width=400),
                normalise="unit",
                datatype="UINT8",
            )
        }
    )
    [image] = model_inputs(volume, windowed)
    assert set(np.unique(image.data)) <= {0, 1}


def test_slices_ordered_by_instance_number(ct_series: list[Dataset]) -> None:
    contract = TISSUE.model_copy(
        update={"pixels": TISSUE.pixels.model_copy(update={"slice_order": "instance-number"})}
    )
    shuffled = [copy.deepcopy(ct_series[i]) for i in (3, 0, 4, 1, 2)]
    volume = volume_from_datasets(shuffled, contract)
    numbers = sorted(int(ds.InstanceNumber) for ds in ct_series)
    by_number = {int(ds.InstanceNumber): str(ds.SOPInstanceUID) for ds in ct_series}
    assert volume.sop_instance_uids == tuple(by_number[n] for n in numbers)


@pytest.mark.parametrize(
    ("number", "message"),
    [("", "lacks InstanceNumber"), (None, "lacks InstanceNumber"), ("1", "two images with one")],
    ids=["empty", "missing", "repeated"],
)
def test_an_instance_number_order_without_usable_numbers_fails_as_conversion(
    ct_series: list[Dataset], number: str | None, message: str
) -> None:
    # InstanceNumber is type 2: an empty one raised ValueError from int(''), no BridgeError.
    contract = TISSUE.model_copy(
        update={"pixels": TISSUE.pixels.model_copy(update={"slice_order": "instance-number"})}
    )
    series = [copy.deepcopy(ds) for ds in ct_series]
    if number is None:
        del series[2].InstanceNumber
    elif number == "":
        series[2].InstanceNumber = ""
    else:
        series[2].InstanceNumber = series[0].InstanceNumber
    with pytest.raises(ImageConversionError, match=message):
        volume_from_datasets(series, contract)


# --- answers against the contract ------------------------------------------------------------


def _answer(**outputs: Tensor) -> InferenceResult:
    return InferenceResult("my-model", "1", None, outputs)


GOOD = {
    "nodule_probability": Tensor.of("nodule_probability", [0.75], "FP32"),
    "nodule_class": Tensor.of("nodule_class", [0.25, 0.75], "FP32"),
}


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            {"nodule_class": GOOD["nodule_class"]},
            r"model my-model returned no output 'nodule_probability' \(contract my-model "
            r"outputs\.measurements\[0\]\.tensor\)",
        ),
        (
            {**GOOD, "nodule_probability": Tensor.of("nodule_probability", [0.7], "FP64")},
            r"output 'nodule_probability' of model my-model is FP64; contract my-model "
            r"outputs\.measurements\[0\]\.datatype allows FP32",
        ),
        (
            {**GOOD, "nodule_probability": Tensor.of("nodule_probability", [0.7, 0.1], "FP32")},
            r"has shape \[2\]; contract my-model outputs\.measurements\[0\]\.shape is \[1\]",
        ),
        (
            {**GOOD, "nodule_class": Tensor.of("nodule_class", [0.2, 0.3, 0.5], "FP32")},
            r"has 3 values; contract my-model outputs\.classifications\[0\]\.classes declares 2",
        ),
    ],
    ids=["missing", "datatype", "shape", "classes"],
)
def test_an_answer_that_breaks_the_contract_names_tensor_and_field(
    outputs: dict[str, Tensor], message: str
) -> None:
    with pytest.raises(OutputConversionError, match=message):
        check_outputs(_answer(**outputs), MY_MODEL, slices=1)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            {**GOOD, "nodule_probability": Tensor.of("nodule_probability", [np.inf], "FP32")},
            r"output 'nodule_probability' of model my-model holds an infinite value "
            r"\(contract my-model outputs\.measurements\[0\]\)",
        ),
        (
            {**GOOD, "nodule_probability": Tensor.of("nodule_probability", [-np.inf], "FP32")},
            r"holds an infinite value \(contract my-model outputs\.measurements\[0\]\)",
        ),
        (
            {**GOOD, "nodule_class": Tensor.of("nodule_class", [-3.0, 7.0], "FP32")},
            r"output 'nodule_class' of model my-model holds a value outside 0\.\.1; contract "
            r"my-model outputs\.classifications\[0\]",
        ),
    ],
    ids=["inf", "minus-inf", "probability-7"],
)
def test_values_fhir_cannot_carry_or_that_are_no_probability_fail_naming_the_field(
    outputs: dict[str, Tensor], message: str
) -> None:
    # An infinity became valueQuantity.value inf: "Infinity" in the JSON, no FHIR decimal.
    with pytest.raises(OutputConversionError, match=message):
        findings(_answer(**outputs), MY_MODEL, slices=1)


def test_a_mean_that_overflows_fails_naming_the_reduce() -> None:
    area = Tensor.of("body_area_cm2", [1.7e308, 1.7e308], "FP64")
    answer = InferenceResult("tissue-composition", "1", None, {"body_area_cm2": area})
    contract = TISSUE.model_copy(
        update={
            "outputs": TISSUE.outputs.model_copy(
                update={"measurements": TISSUE.outputs.measurements[:1]}
            )
        }
    )
    with pytest.raises(OutputConversionError, match=r"outputs\.measurements\[0\]\.reduce"):
        findings(answer, contract, slices=2)


def test_a_classification_becomes_an_observation_with_its_probability() -> None:
    found = findings(_answer(**GOOD), MY_MODEL, slices=1)
    measurement, classification = found
    assert measurement.code.code == "nodule-probability"
    assert isinstance(classification, Classification)
    assert (classification.value.code, classification.probability) == ("present", 0.75)
    bundle = report_bundle(
        found, study_instance_uid="1.2.3", device=DEVICE, report_code=MY_MODEL.report_code
    )
    Bundle.model_validate(bundle)
    report, first, second = (entry["resource"] for entry in bundle["entry"])
    assert report["code"]["coding"][0]["code"] == "nodule-report"
    for observation in (first, second):
        Observation.model_validate(observation)
        assert observation["bodySite"]["coding"][0] == {
            "system": "http://snomed.info/sct",
            "code": "39607008",
            "display": "Lung structure",
        }
        assert observation["device"] == DEVICE
    assert first["valueQuantity"] == {
        "value": 0.75,
        "unit": "1",
        "system": "http://unitsofmeasure.org",
        "code": "1",
    }
    assert second["valueCodeableConcept"]["coding"][0]["code"] == "present"
    [component] = second["component"]
    assert component["code"]["coding"][0]["code"] == "probability"
    assert component["valueQuantity"]["value"] == 0.75
    assert measurements_from_bundle(bundle) == {
        "nodule-probability": {"value": 0.75, "unit": "1"},
        "nodule-presence": {"value": "present", "probability": 0.75},
    }


# --- my-model with real peers ----------------------------------------------------------------


@pytest.fixture
async def archive(orthanc: OrthancProcess, ct_small: Dataset) -> AsyncIterator[DicomWebArchive]:
    client = DicomWebArchive(orthanc.dicomweb_url, timeout=10.0)
    await client.store([ct_small])
    try:
        yield client
    finally:
        client.close()


async def test_my_model_through_orthanc_and_mlserver(
    archive: DicomWebArchive, mlserver: MLServerProcess, ct_small: Dataset
) -> None:
    volume = volume_from_datasets([ct_small], MY_MODEL)
    [image] = model_inputs(volume, MY_MODEL)
    expected = nodule_probability(image.data)
    async with HttpInferenceClient(mlserver.base_url, timeout=30.0) as client:
        outcome = await infer_study(
            archive,
            client,
            study_instance_uid=str(ct_small.StudyInstanceUID),
            contract=MY_MODEL,
            device=DEVICE,
        )
    Bundle.model_validate(outcome.bundle)
    summary = outcome.summary()
    assert summary["nodule-probability"]["value"] == pytest.approx(expected, abs=0.01)
    assert summary["nodule-probability"]["unit"] == "1"
    assert summary["nodule-presence"] == {
        "value": "present" if expected >= 0.5 else "absent",
        "probability": pytest.approx(max(expected, 1 - expected), abs=1e-4),
    }
    assert NODULE_MODEL.name == MY_MODEL.model.name


async def test_the_reference_contract_against_my_model_fails_naming_the_output(
    archive: DicomWebArchive, mlserver: MLServerProcess, ct_small: Dataset
) -> None:
    """The issue's case: a model served under a contract it does not fill fails with the
    tensor and the contract field, not only a missing name."""
    wrong: InferenceContract = TISSUE.model_copy(
        update={
            "inputs": TISSUE.inputs.model_copy(
                update={"image": "image", "spacing": None, "shape": None}
            ),
            "pixels": MY_MODEL.pixels,
            "accepts": MY_MODEL.accepts,
        }
    )
    async with HttpInferenceClient(mlserver.base_url, timeout=30.0) as client:
        with pytest.raises(
            OutputConversionError,
            match=r"model my-model returned no output 'body_area_cm2' \(contract "
            r"tissue-composition outputs\.measurements\[0\]\.tensor\)",
        ):
            await infer_study(
                archive,
                client,
                study_instance_uid=str(ct_small.StudyInstanceUID),
                contract=wrong,
                model=NODULE_MODEL.name,
                device=DEVICE,
            )


# --- ct-density: features, scikit-learn, MLServer's stock runtime -----------------------------


def test_a_histogram_contract_sends_one_row_of_shares(ct_small: Dataset) -> None:
    density = load_contract(DENSITY_CONTRACT)
    [features] = model_inputs(volume_from_datasets([ct_small], density), density)
    assert (features.name, features.datatype, features.shape) == ("features", "FP64", (1, 16))
    hu = ct_small.pixel_array * float(ct_small.RescaleSlope) + float(ct_small.RescaleIntercept)
    expected, _ = np.histogram(np.clip(hu, -200, 200), bins=16, range=(-200, 200))
    np.testing.assert_allclose(features.data[0], expected / hu.size)
    raw = _raw(DENSITY_CONTRACT)
    raw["pixels"]["normalise"] = "zscore"
    with pytest.raises(ContractError, match="histogram_bins counts values over the window"):
        contract_of(raw)


@pytest.mark.parametrize(("shift_hu", "expected"), [(150, "dense"), (-150, "fatty")])
async def test_ct_density_on_mlservers_stock_scikit_learn_runtime(
    orthanc: OrthancProcess, mlserver: MLServerProcess, shift_hu: float, expected: str
) -> None:
    """Studies the classifier never saw (shifted by 150 HU, between its training shifts) come
    back in their class, through real Orthanc and MLServer's scikit-learn runtime."""
    density = load_contract(DENSITY_CONTRACT)
    [study] = make_series(shifted(shift_hu), 1)  # a study of its own
    archive = DicomWebArchive(orthanc.dicomweb_url, timeout=10.0)
    try:
        await archive.store([study])
        async with HttpInferenceClient(mlserver.base_url, timeout=30.0) as client:
            outcome = await infer_study(
                archive,
                client,
                study_instance_uid=str(study.StudyInstanceUID),
                contract=density,
                device=DEVICE,
            )
    finally:
        archive.close()
    Bundle.model_validate(outcome.bundle)
    [finding] = outcome.findings
    assert isinstance(finding, Classification)
    assert finding.code.code == "density-class"
    assert finding.value.code == expected
    assert 0.5 < finding.probability <= 1.0
    assert DENSITY_MODEL.name == density.model.name
