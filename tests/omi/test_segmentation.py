"""The label map as DICOM SEG: from real MLServer, stored in and read back from real Orthanc."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from dsf_bridge.omi.contract import LabelMapOutput, Segment, resolve_contract
from dsf_bridge.omi.conversion import ImageConversionError, model_inputs, volume_from_datasets
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.omi.segmentation import (
    SEGMENT_LABELS,
    SEGMENTATION_STORAGE,
    segment_masks,
    segmentation_dataset,
)
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.refmodel import LABELS, tissue_composition, tissue_labels
from tests.components import REFERENCE_MODEL

TISSUE = resolve_contract("tissue-composition")


def test_segment_labels_match_the_reference_model() -> None:
    assert {name: LABELS[name] for name in SEGMENT_LABELS} == dict(SEGMENT_LABELS)
    # ... and the shipped contract's label map describes the same labels.
    [label_map] = TISSUE.outputs.label_maps
    assert {s.type.code: s.label for s in label_map.segments} == dict(SEGMENT_LABELS)


def test_label_map_agrees_with_the_composition(ct_series: list[Dataset]) -> None:
    volume = volume_from_datasets(ct_series, TISSUE)
    labels = tissue_labels(volume.pixels)
    composition = tissue_composition(volume.pixels, volume.spacing_mm)
    counts = np.bincount(labels.ravel(), minlength=6)
    assert counts[1:].sum() == composition.voxel_count[0]  # body
    assert [counts[LABELS[t]] for t in ("bone", "muscle", "adipose", "air")] == list(
        composition.voxel_count[1:]
    )


def test_seg_structure_and_round_trip(ct_series: list[Dataset]) -> None:
    volume = volume_from_datasets(ct_series, TISSUE)
    labels = tissue_labels(volume.pixels)
    seg = segmentation_dataset(volume, ct_series, labels, algorithm_name="tissue-composition")
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    again = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert again.SOPClassUID == SEGMENTATION_STORAGE
    assert again.StudyInstanceUID == ct_series[0].StudyInstanceUID
    assert again.NumberOfFrames == len(SEGMENT_LABELS) * 5
    assert len(again.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 5
    masks = segment_masks(again)
    np.testing.assert_array_equal(masks["Skeletal muscle"], labels == LABELS["muscle"])
    np.testing.assert_array_equal(masks["Bone"], labels == LABELS["bone"])


_SNOMED = "http://snomed.info/sct"
_ABNORMAL = {"system": _SNOMED, "code": "49755003", "display": "Morphologically abnormal structure"}
_NODULE = {"system": _SNOMED, "code": "27925004", "display": "Nodule"}


def _nodule_segments(*labels: int) -> list[Segment]:
    names = ["Left lung nodule", "Right lung nodule", "Third nodule"]
    return [
        Segment.model_validate(
            {"label": label, "name": name, "category": _ABNORMAL, "type": _NODULE}
        )
        for label, name in zip(labels, names, strict=False)
    ]


def test_a_contracts_segments_become_the_segs_segments(ct_small: Dataset) -> None:
    # Two segments of the same type: before, a dict keyed by the type's code kept one of them,
    # and every code went out under the private scheme 99DSFB with the code as its meaning.
    volume = volume_from_datasets([ct_small], TISSUE)
    labels = np.zeros(volume.pixels.shape, dtype=np.uint8)
    labels[0, :5, :5] = 1
    labels[0, 10:15, 10:15] = 2
    seg = segmentation_dataset(
        volume,
        [ct_small],
        labels,
        algorithm_name="my-model",
        segments=_nodule_segments(1, 2),
        description="Lung nodules",
    )
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [
        "Left lung nodule",
        "Right lung nodule",
    ]
    for item in seg.SegmentSequence:
        [kind] = item.SegmentedPropertyTypeCodeSequence
        [category] = item.SegmentedPropertyCategoryCodeSequence
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
            "27925004",
            "SCT",
            "Nodule",
        )
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    assert seg.ContentDescription == "Lung nodules"
    masks = segment_masks(seg)
    np.testing.assert_array_equal(masks["Left lung nodule"], labels == 1)
    np.testing.assert_array_equal(masks["Right lung nodule"], labels == 2)


def test_a_label_map_refuses_a_label_twice_and_a_system_dicom_cannot_name() -> None:
    segments = [s.model_dump() for s in _nodule_segments(1, 2, 2)]
    with pytest.raises(ValidationError, match="label declared twice: 2"):
        LabelMapOutput.model_validate({"tensor": "labels", "segments": segments})
    with pytest.raises(ValidationError, match="has no DICOM coding scheme designator"):
        Segment.model_validate(
            {
                "label": 1,
                "name": "x",
                "category": _ABNORMAL,
                "type": {"system": "http://example.org/codes", "code": "x", "display": "x"},
            }
        )


def test_label_map_must_match_the_series(ct_small: Dataset) -> None:
    volume = volume_from_datasets([ct_small], TISSUE)
    with pytest.raises(ImageConversionError, match="does not match"):
        segmentation_dataset(volume, [ct_small], np.zeros((2, 128, 128)), algorithm_name="m")


@pytest.fixture
async def archive(orthanc: OrthancProcess) -> AsyncIterator[DicomWebArchive]:
    client = DicomWebArchive(
        orthanc.dicomweb_url, timeout=10.0, retry=RetryPolicy(attempts=2, initial_delay=0.05)
    )
    try:
        yield client
    finally:
        client.close()


async def test_seg_from_mlserver_stored_in_orthanc(
    archive: DicomWebArchive, mlserver: MLServerProcess, ct_series: list[Dataset]
) -> None:
    await archive.store(ct_series)
    study = str(ct_series[0].StudyInstanceUID)
    sources = await archive.retrieve_study(study)
    volume = volume_from_datasets(sources, TISSUE)
    async with HttpInferenceClient(mlserver.base_url) as client:
        result = await client.infer(
            REFERENCE_MODEL.name, model_inputs(volume, TISSUE), outputs=["tissue_labels"]
        )
    labels = result["tissue_labels"]
    assert labels.datatype == "UINT8"
    assert labels.shape == volume.pixels.shape
    np.testing.assert_array_equal(labels.data, tissue_labels(volume.pixels))

    seg = segmentation_dataset(volume, sources, labels.data, algorithm_name=REFERENCE_MODEL.name)
    stored = await archive.store([seg])
    assert stored.stored == (str(seg.SOPInstanceUID),)
    series = {s.series_instance_uid: s.modality for s in await archive.search_series(study)}
    assert series[str(seg.SeriesInstanceUID)] == "SEG"
    [back] = await archive.retrieve_series(study, str(seg.SeriesInstanceUID))
    masks = segment_masks(back)
    np.testing.assert_array_equal(masks["Adipose tissue"], labels.data == LABELS["adipose"])
    # The study's CT series is still what a new request picks up.
    assert len(await archive.retrieve_study(study, str(ct_series[0].SeriesInstanceUID))) == 5


async def test_a_stored_seg_is_never_taken_as_model_input(
    archive: DicomWebArchive, ct_small: Dataset
) -> None:
    await archive.store([ct_small])
    volume = volume_from_datasets([ct_small], TISSUE)
    seg = segmentation_dataset(
        volume, [ct_small], tissue_labels(volume.pixels), algorithm_name="tissue-composition"
    )
    await archive.store([seg])
    # One CT instance and one SEG instance: the tie must go to the CT.
    [picked] = await archive.retrieve_study(str(ct_small.StudyInstanceUID))
    assert picked.Modality == "CT"
