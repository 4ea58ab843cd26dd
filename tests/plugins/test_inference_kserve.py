"""Inference between two sandbox sites on the third OIP v2 server, real KServe (binary tensors
both ways, chosen by ``tensor_encoding = "auto"``), with real Orthanc: the result matches the
reference model's computation, and a series past the provider's ``max_slices`` fails with
``request-invalid`` naming the limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog.testing

from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.plugins.inference import result_summary
from dsf_bridge.sandbox.components import KServeProcess, OrthancProcess
from dsf_bridge.sandbox.demo import InferenceNetwork
from dsf_bridge.sandbox.refmodel import tissue_composition
from tests.omi.data import load_ct_small, make_series

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"


def _error(task: dict[str, Any]) -> str:
    [error] = [
        o["valueString"]
        for o in task.get("output") or []
        if o["type"]["coding"][0]["code"] == "error"
    ]
    return str(error)


async def test_inference_on_kserve_between_two_sites(
    tmp_path: Path, orthanc: OrthancProcess, kserve: KServeProcess
) -> None:
    series = make_series(load_ct_small(), 3)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(series)
    finally:
        archive.close()
    spacing = (float(series[0].SliceThickness), *map(float, series[0].PixelSpacing))
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in series]
    )
    expected = tissue_composition(hu, spacing)
    served = {"inference_url": kserve.base_url, "contract": "tissue-composition"}
    provider = {
        "catalogue": [
            {"id": "tissue-kserve", **served},
            {"id": "tissue-kserve-short", **served, "max_slices": 2},
        ]
    }
    requester = {
        "catalogue": [
            {"id": "tissue-kserve", "organization": PROVIDER},
            {"id": "tissue-kserve-short", "organization": PROVIDER},
        ]
    }
    study = str(series[0].StudyInstanceUID)
    with structlog.testing.capture_logs() as logs:
        async with InferenceNetwork(
            tmp_path / "sites", {REQUESTER: requester, PROVIDER: provider}
        ) as network:
            started = {
                service: await network.request(
                    REQUESTER,
                    study_instance_uid=study,
                    dicomweb_endpoint=orthanc.dicomweb_url,
                    service=service,
                )
                for service in ("tissue-kserve", "tissue-kserve-short")
            }
            finished = await network.finished(REQUESTER, list(started.values()), 60)
            await network.settled()
    # The provider chose binary tensors for KServe (tensor_encoding auto), once per job.
    chosen = [e for e in logs if e["event"] == "tensor_encoding.chosen"]
    assert chosen
    assert {(e["encoding"], e["reason"]) for e in chosen} == {("binary", "server kserve")}

    done = finished[started["tissue-kserve"]]
    assert done["status"] == "completed", done.get("output")
    summary = result_summary(done)
    assert summary["body-volume"]["value"] == pytest.approx(expected.volume_ml[0], abs=0.01)
    assert summary["muscle-mean-hu"]["value"] == pytest.approx(expected.mean_hu[2], abs=0.01)
    short = finished[started["tissue-kserve-short"]]
    assert short["status"] == "failed"
    assert "(request-invalid)" in _error(short)
    assert "3 slices, more than the limit of 2" in _error(short)
    assert "(max_slices)" in _error(short)
