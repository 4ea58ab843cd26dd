"""A model's label map as a DICOM Segmentation (SEG, BINARY), to store beside the study.

The SEG belongs to the study it was computed from: it repeats that study's patient and study
attributes, as DICOM requires, and goes back over DICOMweb (STOW-RS) to the archive that holds
the study. It never travels in a DSF Task; the Task carries only its Series Instance UID.

One segment per label the contract describes (its name, category and type codes; a FHIR
system such as SNOMED CT becomes its DICOM coding scheme designator, ``SCT``), one frame per
segment and slice; frames are ordered segment by segment, slices in the order of
:class:`~dsf_bridge.omi.conversion.ImageVolume`. Without descriptions, the reference model's
labels (:data:`SEGMENT_LABELS`) under the private coding scheme :data:`CODING_SCHEME`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels.utils import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from dsf_bridge.omi.contract import Coding, Segment, dicom_scheme
from dsf_bridge.omi.conversion import ImageConversionError, ImageVolume

__all__ = [
    "CODING_SCHEME",
    "SEGMENTATION_STORAGE",
    "SEGMENT_LABELS",
    "segment_masks",
    "segmentation_dataset",
]

SEGMENTATION_STORAGE = SegmentationStorage
# Private coding schemes start with "99" (PS3.3 8.2).
CODING_SCHEME = "99DSFB"
# Label values of the reference contract's ``tissue_labels`` output, by segment.
SEGMENT_LABELS: Mapping[str, int] = {"bone": 2, "muscle": 3, "adipose": 4, "air": 5}
_SEGMENT_NAMES = {
    "bone": "Bone",
    "muscle": "Skeletal muscle",
    "adipose": "Adipose tissue",
    "air": "Air inside the body",
}
# Patient and study attributes a SEG shares with its source images (type 2: present, may be
# empty).
_SHARED_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def segmentation_dataset(
    volume: ImageVolume,
    sources: Sequence[Dataset],
    labels: npt.ArrayLike,
    *,
    algorithm_name: str,
    algorithm_version: str = "1",
    segment_labels: Mapping[str, int] = SEGMENT_LABELS,
    segments: Sequence[Segment] | None = None,
    description: str = "Tissue composition by Hounsfield units",
    series_number: int = 900,
    now: dt.datetime | None = None,
) -> Dataset:
    """Build the SEG for ``labels`` (slices, rows, columns) computed from ``volume``.

    ``sources`` are the retrieved images of the volume's series, in any order.
    """
    label_map = np.asarray(labels)
    if label_map.shape != volume.pixels.shape:
        raise ImageConversionError(
            f"label map of shape {list(label_map.shape)} does not match the series "
            f"{list(volume.pixels.shape)}"
        )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    try:
        ordered = [by_uid[uid] for uid in volume.sop_instance_uids]
    except KeyError as exc:
        raise ImageConversionError(f"source image {exc.args[0]} is missing") from None
    first = ordered[0]
    moment = now or dt.datetime.now(dt.UTC)

    # A FileDataset with preamble: STOW-RS bodies must be DICOM files (Part 10), and pydicom
    # writes the "DICM" header only for datasets that carry a preamble.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    seg = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    seg.SOPInstanceUID = generate_uid()
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.SOPClassUID = SEGMENTATION_STORAGE
    for keyword in _SHARED_KEYWORDS:
        setattr(seg, keyword, first.get(keyword, ""))
    seg.Modality = "SEG"
    seg.SeriesInstanceUID = generate_uid()
    seg.SeriesNumber = series_number
    seg.SeriesDescription = f"{algorithm_name} segmentation"
    seg.InstanceNumber = 1
    seg.FrameOfReferenceUID = first.get("FrameOfReferenceUID", generate_uid())
    seg.PositionReferenceIndicator = ""
    seg.Manufacturer = "dsf-bridge"
    seg.ManufacturerModelName = algorithm_name
    seg.DeviceSerialNumber = "0"
    seg.SoftwareVersions = algorithm_version
    seg.ContentDate = moment.strftime("%Y%m%d")
    seg.ContentTime = moment.strftime("%H%M%S")
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    seg.InstanceCreationDate, seg.InstanceCreationTime = seg.ContentDate, seg.ContentTime
    seg.ContentLabel = "SEGMENTATION"
    seg.ContentDescription = description[:64]
    seg.ContentCreatorName = ""
    seg.ImageType = ["DERIVED", "PRIMARY"]
    seg.SamplesPerPixel = 1
    seg.PhotometricInterpretation = "MONOCHROME2"
    seg.Rows, seg.Columns = int(label_map.shape[1]), int(label_map.shape[2])
    seg.BitsAllocated = 1
    seg.BitsStored = 1
    seg.HighBit = 0
    seg.PixelRepresentation = 0
    seg.LossyImageCompression = "00"
    seg.SegmentationType = "BINARY"

    # The contract's segment descriptions when given (their codes, names and labels), else the
    # reference model's labels under the private scheme.
    described = (
        list(segments)
        if segments is not None
        else [_reference_segment(name, value) for name, value in segment_labels.items()]
    )
    seg.SegmentSequence = [
        _segment(number, segment, algorithm_name) for number, segment in enumerate(described, 1)
    ]
    referenced = Dataset()
    referenced.SeriesInstanceUID = volume.series_instance_uid
    referenced.ReferencedInstanceSequence = [_reference(ds) for ds in ordered]
    seg.ReferencedSeriesSequence = [referenced]
    seg.DimensionOrganizationSequence = [Dataset()]
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = generate_uid()
    organization = seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
    seg.DimensionIndexSequence = [
        _dimension(organization, 0x0062000B, 0x0062000A, "Segment"),
        _dimension(organization, 0x00200032, 0x00209113, "Position"),
    ]
    seg.SharedFunctionalGroupsSequence = [_shared_groups(volume, first)]

    frames: list[npt.NDArray[np.bool_]] = []
    per_frame: list[Dataset] = []
    for number, segment in enumerate(described, 1):
        for index, source in enumerate(ordered):
            frames.append(label_map[index] == segment.label)
            per_frame.append(_frame(number, index, source))
    seg.PerFrameFunctionalGroupsSequence = per_frame
    seg.NumberOfFrames = len(frames)
    seg.PixelData = pack_bits(np.stack(frames).astype(np.uint8))
    return seg


def _reference_segment(name: str, label: int) -> Segment:
    meaning = _SEGMENT_NAMES.get(name, name)
    return Segment(
        label=label,
        name=meaning,
        category=Coding(system=CODING_SCHEME, code="tissue", display="Tissue"),
        type=Coding(system=CODING_SCHEME, code=name, display=meaning),
    )


def _coded(coding: Coding) -> Dataset:
    return _code(coding.code, dicom_scheme(coding.system), coding.display)


def _segment(number: int, segment: Segment, algorithm_name: str) -> Dataset:
    item = Dataset()
    item.SegmentNumber = number
    item.SegmentLabel = segment.name
    item.SegmentAlgorithmType = "AUTOMATIC"
    item.SegmentAlgorithmName = algorithm_name
    item.SegmentedPropertyCategoryCodeSequence = [_coded(segment.category)]
    item.SegmentedPropertyTypeCodeSequence = [_coded(segment.type)]
    return item


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _dimension(organization: str, index: int, functional_group: int, label: str) -> Dataset:
    item = Dataset()
    item.DimensionOrganizationUID = organization
    item.DimensionIndexPointer = index
    item.FunctionalGroupPointer = functional_group
    item.DimensionDescriptionLabel = label
    return item


def _shared_groups(volume: ImageVolume, first: Dataset) -> Dataset:
    measures = Dataset()
    measures.PixelSpacing = [volume.spacing_mm[1], volume.spacing_mm[2]]
    measures.SliceThickness = first.get("SliceThickness", volume.spacing_mm[0])
    measures.SpacingBetweenSlices = volume.spacing_mm[0]
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    return shared


def _frame(segment: int, index: int, source: Dataset) -> Dataset:
    derivation = Dataset()
    source_image = _reference(source)
    source_image.PurposeOfReferenceCodeSequence = [
        _code("121322", "DCM", "Source image for image processing operation")
    ]
    derivation.SourceImageSequence = [source_image]
    derivation.DerivationCodeSequence = [_code("113076", "DCM", "Segmentation")]
    content = Dataset()
    content.DimensionIndexValues = [segment, index + 1]
    position = Dataset()
    position.ImagePositionPatient = source.get("ImagePositionPatient", [0.0, 0.0, float(index)])
    identification = Dataset()
    identification.ReferencedSegmentNumber = segment
    frame = Dataset()
    frame.DerivationImageSequence = [derivation]
    frame.FrameContentSequence = [content]
    frame.PlanePositionSequence = [position]
    frame.SegmentIdentificationSequence = [identification]
    return frame


def segment_masks(seg: Dataset) -> dict[str, npt.NDArray[np.bool_]]:
    """The masks of a SEG made by :func:`segmentation_dataset`, by segment label, each of shape
    (slices, rows, columns): for checking what an archive gives back."""
    frames: npt.NDArray[Any] = seg.pixel_array.astype(bool)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    masks: dict[str, list[npt.NDArray[np.bool_]]] = {}
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks.setdefault(labels[number], []).append(frame)
    return {label: np.stack(items) for label, items in masks.items()}
