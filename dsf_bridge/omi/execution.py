"""One inference on one imaging study, as the providing site's process runs it: check the model
is ready, fetch the study (QIDO-RS then WADO-RS), convert it, infer, build the FHIR result and,
when asked, store the label map as a DICOM SEG back into the archive (STOW-RS).

The steps raise the adapters' own errors unchanged (``StudyNotFoundError``,
``ArchiveUnavailableError``, ``ModelNotReadyError``, ``InferenceError``,
``ImageConversionError``, ...), so the process can tell the requester which step failed and
the runtime can decide on a retry from ``retryable``.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from dsf_bridge.omi.conversion import (
    COMPOSITION_OUTPUTS,
    Measurement,
    composition_measurements,
    report_bundle,
    volume_from_datasets,
)
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.omi.segmentation import segmentation_dataset

__all__ = ["StudyInference", "infer_study"]

_T = TypeVar("_T")

_log = structlog.get_logger()


@dataclass(frozen=True)
class StudyInference:
    """The outcome of :func:`infer_study`: the FHIR transaction Bundle and what it reports."""

    study_instance_uid: str
    series_instance_uid: str
    slices: int
    measurements: tuple[Measurement, ...]
    bundle: dict[str, Any]
    segmentation_series_uid: str | None = None

    def summary(self) -> dict[str, dict[str, Any]]:
        """Measurements by name for people and the demo's JSON: ``body`` ... ``air`` are areas
        (cm2, per slice; the mean per slice for a series), ``<tissue>_volume`` volumes (mL,
        series only), ``<tissue>_mean_hu`` mean attenuation."""
        names = {
            "area_cm2": "{tissue}",
            "volume_ml": "{tissue}_volume",
            "mean_hu": "{tissue}_mean_hu",
        }
        units = {"area_cm2": "cm2", "volume_ml": "mL", "mean_hu": "HU"}
        return {
            names[m.quantity].format(tissue=m.tissue): {
                "value": None if m.value is None else round(m.value, 2),
                "unit": units[m.quantity],
            }
            for m in self.measurements
        }


async def infer_study(
    archive: DicomWebArchive,
    client: HttpInferenceClient,
    *,
    study_instance_uid: str,
    model: str,
    device: Mapping[str, Any],
    series_instance_uid: str | None = None,
    model_version: str | None = None,
    request_id: str | None = None,
    segmentation: bool = False,
) -> StudyInference:
    """Run the model on the study (or the named series) and return the FHIR result.

    With ``segmentation``, the model's ``tissue_labels`` output becomes a DICOM SEG stored in
    the same archive, in the same study.
    """
    # Readiness first: no study is fetched for a model that cannot take it.
    await client.ensure_model_ready(model, model_version)
    datasets = await archive.retrieve_study(study_instance_uid, series_instance_uid)
    # Decoding pixels and building the SEG take seconds of CPU for a large series: in a worker
    # thread, so that the event loop keeps serving the websocket and the other Tasks meanwhile.
    volume = await _off_loop(
        volume_from_datasets, datasets, series_instance_uid=series_instance_uid
    )
    tensors = await _off_loop(volume.to_tensors)
    result = await client.infer(
        model,
        tensors,
        version=model_version,
        request_id=request_id,
        outputs=[*COMPOSITION_OUTPUTS, "tissue_labels"] if segmentation else None,
    )
    measurements = composition_measurements(result, slices=volume.slices)
    bundle = report_bundle(
        measurements,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid if volume.slices > 1 else None,
        slices=volume.slices,
        device=device,
    )
    segmentation_series_uid = None
    if segmentation:
        seg = await _off_loop(
            segmentation_dataset,
            volume,
            datasets,
            result["tissue_labels"].data,
            algorithm_name=model,
            algorithm_version=model_version or result.model_version or "1",
        )
        await archive.store([seg])
        segmentation_series_uid = str(seg.SeriesInstanceUID)
    # No study or series UID in the log: they identify a patient's examination.
    _log.info(
        "study_inference.completed",
        slices=volume.slices,
        measurements=len(measurements),
    )
    return StudyInference(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        slices=volume.slices,
        measurements=tuple(measurements),
        bundle=bundle,
        segmentation_series_uid=segmentation_series_uid,
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
