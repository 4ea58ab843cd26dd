"""One inference on one imaging study, as the providing site's process runs it under the
service's contract: check the model is ready, fetch the study (QIDO-RS then WADO-RS), check it
against the contract and convert it, infer, check the answer against the contract, build the
FHIR result and, when asked, store the label map as a DICOM SEG back into the archive (STOW-RS),
with a DICOM SR measurement report of the segments' measurements when the contract has any.

The steps raise the adapters' own errors unchanged (``StudyNotFoundError``,
``ArchiveUnavailableError``, ``ModelNotReadyError``, ``InferenceError``,
``RequestNotAcceptedError``, ``ImageConversionError``, ``OutputConversionError``, ...), so the
process can tell the requester which step failed and the runtime can decide on a retry from
``retryable``.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from pydicom.dataset import Dataset

from dsf_bridge.omi.contract import InferenceContract, RequestNotAcceptedError
from dsf_bridge.omi.conversion import (
    Classification,
    Finding,
    check_outputs,
    findings,
    model_inputs,
    report_bundle,
    volume_from_datasets,
)
from dsf_bridge.omi.dicomweb import SeriesInfo, StoreResult, StudyNotFoundError
from dsf_bridge.omi.inference import HttpInferenceClient, TensorLimitError
from dsf_bridge.omi.report_sr import measurement_report, reports_segments
from dsf_bridge.omi.segmentation import segmentation_dataset

__all__ = ["ReceivedSeries", "StudyInference", "StudySource", "infer_study"]

_T = TypeVar("_T")

_log = structlog.get_logger()


class StudySource(Protocol):
    """Where a study comes from and where a SEG (and its SR) goes: a DICOMweb archive
    (:class:`~dsf_bridge.omi.dicomweb.DicomWebArchive`) or a series received as a package
    (:class:`ReceivedSeries`)."""

    async def search_series(self, study_instance_uid: str) -> list[SeriesInfo]: ...

    def choose_series(
        self,
        series: Sequence[SeriesInfo],
        study_instance_uid: str,
        series_instance_uid: str | None = None,
    ) -> SeriesInfo: ...

    async def retrieve_series(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> list[Dataset]: ...

    async def store(self, datasets: Sequence[Dataset]) -> StoreResult: ...


@dataclass
class ReceivedSeries:
    """One series that arrived as a package (issue 13): what QIDO-RS would say of it, and its
    instances read when the model needs them. A SEG (and its SR) is kept in :attr:`stored` to
    travel back the same way instead of being written into an archive."""

    study_instance_uid: str
    series: SeriesInfo
    load: Callable[[], list[Dataset]]
    stored: list[Dataset] = field(default_factory=list)

    async def search_series(self, study_instance_uid: str) -> list[SeriesInfo]:
        if study_instance_uid != self.study_instance_uid:
            raise StudyNotFoundError(
                f"the package holds study {self.study_instance_uid}, not {study_instance_uid}",
                url="package",
            )
        return [self.series]

    def choose_series(
        self,
        series: Sequence[SeriesInfo],
        study_instance_uid: str,
        series_instance_uid: str | None = None,
    ) -> SeriesInfo:
        if series_instance_uid not in (None, self.series.series_instance_uid):
            raise StudyNotFoundError(
                f"the package holds series {self.series.series_instance_uid}, not "
                f"{series_instance_uid}",
                url="package",
            )
        return self.series

    async def retrieve_series(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> list[Dataset]:
        # Reading verifies each instance's digest: CPU and disk, off the event loop.
        return await _off_loop(self.load)

    async def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        self.stored.extend(datasets)
        return StoreResult(stored=tuple(str(d.SOPInstanceUID) for d in datasets), failed=())


@dataclass(frozen=True)
class StudyInference:
    """The outcome of :func:`infer_study`: the FHIR transaction Bundle and what it reports."""

    study_instance_uid: str
    series_instance_uid: str
    slices: int
    findings: tuple[Finding, ...]
    bundle: dict[str, Any]
    segmentation_series_uid: str | None = None
    # The DICOM SR measurement report stored with the SEG, when the contract's measurements
    # name segments (omi/report_sr.py).
    report_series_uid: str | None = None

    def summary(self) -> dict[str, dict[str, Any]]:
        """Findings by code for people and the demo's JSON: a measurement's value and unit
        (None when absent), a classification's class code and probability."""
        shown: dict[str, dict[str, Any]] = {}
        for finding in self.findings:
            if isinstance(finding, Classification):
                shown[finding.code.code] = {
                    "value": finding.value.code,
                    "probability": round(finding.probability, 4),
                }
            else:
                shown[finding.code.code] = {
                    "value": None if finding.value is None else round(finding.value, 2),
                    "unit": finding.unit_text or finding.unit,
                }
        return shown


async def infer_study(
    archive: StudySource,
    client: HttpInferenceClient,
    *,
    study_instance_uid: str,
    contract: InferenceContract,
    device: Mapping[str, Any],
    series_instance_uid: str | None = None,
    model: str | None = None,
    model_version: str | None = None,
    request_id: str | None = None,
    segmentation: bool = False,
    with_report: bool = True,
    max_slices: int | None = None,
) -> StudyInference:
    """Run the contract's model on the study (or the named series) and return the FHIR result.

    ``model`` and ``model_version`` override the contract's (a site may serve a contract under
    another name). With ``segmentation``, the contract's label map becomes a DICOM SEG stored
    in the same archive, in the same study, and the measurements that name its segments a
    DICOM SR (TID 1500) stored with it unless ``with_report`` is false.
    """
    model = model or contract.model.name
    model_version = model_version or contract.model.version
    contract.check_request(series_named=series_instance_uid is not None, segmentation=segmentation)
    label_map = contract.outputs.label_maps[0] if contract.outputs.label_maps else None
    # Readiness first: no study is fetched for a model that cannot take it.
    await client.ensure_model_ready(model, model_version)
    # The tensor encoding too (auto: one GET /v2), while the server is known to answer.
    await client.choose_encoding()
    # The series the model would take, checked against the contract from what QIDO-RS says of
    # it before its instances are retrieved: a 2,000-slice series for a one-slice contract is
    # refused without holding 2,000 images in memory first.
    in_study = await archive.search_series(study_instance_uid)
    chosen = archive.choose_series(in_study, study_instance_uid, series_instance_uid)
    if chosen.modality:
        contract.check_series(
            modalities=[chosen.modality],
            body_parts=[chosen.body_part or ""],
            slices=chosen.instance_count,
            series_named=series_instance_uid is not None,
        )
    _check_slices(chosen.instance_count, max_slices)
    datasets = await archive.retrieve_series(study_instance_uid, chosen.series_instance_uid)
    # Decoding pixels and building the SEG take seconds of CPU for a large series: in a worker
    # thread, so that the event loop keeps serving the websocket and the other Tasks meanwhile.
    volume = await _off_loop(
        volume_from_datasets, datasets, contract, series_instance_uid=series_instance_uid
    )
    _check_slices(volume.slices, max_slices)
    # The image is checked against the request's limit before it is made: a fine resampling
    # multiplies the pixels (docs/omi.md, "Limits per request").
    tensors = await _off_loop(model_inputs, volume, contract, max_bytes=client.max_request_bytes)
    try:
        result = await client.infer(
            model,
            tensors,
            version=model_version,
            request_id=request_id,
            outputs=contract.requested_outputs(label_maps=segmentation),
        )
    except TensorLimitError as exc:
        raise RequestNotAcceptedError(f"the series is too large for this site: {exc}") from exc
    del tensors
    check_outputs(result, contract, slices=volume.slices, label_maps=segmentation)
    found = findings(result, contract, slices=volume.slices)
    bundle = report_bundle(
        found,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid if volume.slices > 1 else None,
        slices=volume.slices,
        device=device,
        report_code=contract.report_code,
    )
    segmentation_series_uid = report_series_uid = None
    if segmentation and label_map is not None:
        version = model_version or result.model_version or "1"
        seg = await _off_loop(
            segmentation_dataset,
            volume,
            datasets,
            result[label_map.tensor].data,
            algorithm_name=model,
            algorithm_version=version,
            segments=label_map.segments,
            description=contract.title,
        )
        results = [seg]
        if with_report and reports_segments(contract):
            report = await _off_loop(
                measurement_report,
                seg,
                datasets,
                found,
                contract,
                algorithm_name=model,
                algorithm_version=version,
            )
            if report is not None:
                results.append(report)
                report_series_uid = str(report.SeriesInstanceUID)
        # One STOW-RS: the SR never lands in an archive without the SEG it refers to.
        await archive.store(results)
        segmentation_series_uid = str(seg.SeriesInstanceUID)
    # No study or series UID in the log: they identify a patient's examination.
    _log.info(
        "study_inference.completed",
        contract=contract.name,
        slices=volume.slices,
        findings=len(found),
    )
    return StudyInference(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        slices=volume.slices,
        findings=tuple(found),
        bundle=bundle,
        segmentation_series_uid=segmentation_series_uid,
        report_series_uid=report_series_uid,
    )


def _check_slices(slices: int | None, max_slices: int | None) -> None:
    if slices is not None and max_slices is not None and slices > max_slices:
        raise RequestNotAcceptedError(
            f"the series has {slices} slices, more than the limit of {max_slices} this site "
            "takes per request (max_slices)"
        )


# At most this many studies are decoded or turned into a SEG at once (one per core): many
# concurrent inference jobs must not hold that many volumes in memory side by side. Waiting
# happens on the event loop, not in a worker thread: a thread blocked on a semaphore would hold
# one of the default executor's few threads, which DICOMweb calls need too.
_DECODERS = max(1, os.cpu_count() or 1)
_decoding: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def _off_loop(function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``function`` in a worker thread, among at most :data:`_DECODERS` at a time."""
    loop = asyncio.get_running_loop()
    gate = _decoding.get(loop)
    if gate is None:
        gate = _decoding[loop] = asyncio.Semaphore(_DECODERS)
    async with gate:
        return await asyncio.to_thread(function, *args, **kwargs)
