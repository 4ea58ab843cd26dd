"""Issue 12's ``my-model`` case end to end between two sandbox sites, real Orthanc and real
MLServer: a provider's own model configured through the environment only (a catalogue entry
naming its contract file, docs/examples/my-model.toml), and each contract mismatch failing with
a reason that names the field, at the requesting site before anything is sent when it knows the
contract, at the provider otherwise. ``ct-density`` (the shipped contract
dsf_bridge/omi/contracts/ct-density.toml, MLServer's stock scikit-learn runtime) runs beside
it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dsf_bridge.config import load_settings
from dsf_bridge.dsf.versions import release
from dsf_bridge.dsf.vocabulary import READ_ACCESS_TAG_SYSTEM
from dsf_bridge.omi.contract import load_contract
from dsf_bridge.omi.conversion import model_inputs, volume_from_datasets
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.plugins.inference import CODESYSTEM_OMI, result_summary
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.demo import InferenceNetwork
from dsf_bridge.sandbox.refmodel.density import shifted
from dsf_bridge.sandbox.refmodel.nodule import nodule_probability
from tests.components import DENSITY_CONTRACT
from tests.omi.data import load_ct_small, make_series

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
MY_MODEL_FILE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "my-model.toml"
MY_MODEL = load_contract(MY_MODEL_FILE)


def _mr_small() -> Dataset:
    path = get_testdata_file("MR_small.dcm")
    if path is None:  # pragma: no cover - ships in every pydicom wheel
        pytest.fail("MR_small.dcm is missing from the pydicom installation")
    return pydicom.dcmread(path)


def _error(task: dict[str, Any]) -> str:
    [error] = [
        o["valueString"]
        for o in task.get("output") or []
        if o["type"]["coding"][0]["code"] == "error"
    ]
    return str(error)


@pytest.mark.parametrize("dsf_version", ["2.1", "1.9"], ids=lambda v: f"dsf{v}")
async def test_my_model_configured_by_environment_only_and_contract_mismatches(
    tmp_path: Path, orthanc: OrthancProcess, mlserver: MLServerProcess, dsf_version: str
) -> None:
    ct_small, mr_small = load_ct_small(), _mr_small()
    # Studies of their own (new UIDs): CT_small saying it shows the head, and shifted by 150 HU.
    [head] = make_series(ct_small, 1)
    head.BodyPartExamined = "HEAD"
    [dense] = make_series(shifted(150), 1)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store([ct_small, mr_small, head, dense])
    finally:
        archive.close()
    [image] = model_inputs(volume_from_datasets([ct_small], MY_MODEL), MY_MODEL)
    expected = nodule_probability(image.data)

    # The provider: nothing but environment variables. "my-model-wrong" declares an output the
    # model does not have (inline contract: the file's, with one tensor renamed).
    wrong = MY_MODEL.model_dump(mode="json")
    wrong["outputs"]["measurements"][0]["tensor"] = "nodule_score"
    served = {"inference_url": mlserver.base_url, "contract": str(MY_MODEL_FILE)}
    environment = {
        "DSF_BRIDGE_OMI__CATALOGUE": json.dumps(
            [
                {"id": "my-model", **served},
                {"id": "my-model-unchecked", **served},
                {"id": "my-model-wrong", "inference_url": mlserver.base_url, "contract": wrong},
                {
                    "id": "ct-density",
                    "inference_url": mlserver.base_url,
                    "contract": str(DENSITY_CONTRACT),
                },
            ]
        )
    }
    provider = load_settings(environ=environment).omi.model_dump(mode="json")
    # The requester knows the contract of "my-model", and a stricter one for "my-model-chest"
    # (a service the provider does not even offer: the request never gets there).
    chest = MY_MODEL.model_dump(mode="json")
    chest["accepts"]["body_part"] = ["CHEST"]
    requester = {
        "catalogue": [
            {"id": "my-model", "organization": PROVIDER, "contract": str(MY_MODEL_FILE)},
            {"id": "my-model-chest", "organization": PROVIDER, "contract": chest},
            {"id": "my-model-unchecked", "organization": PROVIDER},
            {"id": "my-model-wrong", "organization": PROVIDER},
            {"id": "ct-density", "organization": PROVIDER, "contract": str(DENSITY_CONTRACT)},
        ]
    }
    ct, mr = str(ct_small.StudyInstanceUID), str(mr_small.StudyInstanceUID)
    async with InferenceNetwork(
        tmp_path / "sites",
        {REQUESTER: requester, PROVIDER: provider},
        dsf_release=release(dsf_version),
    ) as network:
        started = {}
        for label, study, service in (
            ("ct", ct, "my-model"),
            ("mr checked here", mr, "my-model"),
            ("mr checked there", mr, "my-model-unchecked"),
            ("head", str(head.StudyInstanceUID), "my-model-chest"),
            ("dense", str(dense.StudyInstanceUID), "ct-density"),
            ("wrong contract", ct, "my-model-wrong"),
        ):
            task_id = await network.request(
                REQUESTER,
                study_instance_uid=study,
                dicomweb_endpoint=orthanc.dicomweb_url,
                service=service,
            )
            started[label] = task_id
        finished = await network.finished(REQUESTER, list(started.values()), 60)
        await network.settled()

        done = finished[started["ct"]]
        assert done["status"] == "completed", done.get("output")
        summary = result_summary(done)
        assert summary["nodule-probability"] == {
            "value": pytest.approx(expected, abs=0.01),
            "unit": "1",
        }
        assert summary["nodule-presence"] == {
            "value": "present" if expected >= 0.5 else "absent",
            "probability": pytest.approx(max(expected, 1 - expected), abs=1e-3),
        }
        # The stored report: the contract's codes, units and body site.
        [reference] = [
            o["valueReference"]["reference"]
            for o in done["output"]
            if o["type"]["coding"][0] == {"system": CODESYSTEM_OMI, "code": "inference-result"}
        ]
        async with network.client(REQUESTER) as client:
            bundle = await client.read("Bundle", reference.split("/")[1])
        assert bundle["meta"]["tag"][0] == {"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"}
        report, *observations = (entry["resource"] for entry in bundle["entry"])
        assert report["code"]["coding"][0]["code"] == "nodule-report"
        by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
        assert set(by_code) == {"nodule-probability", "nodule-presence"}
        assert by_code["nodule-probability"]["valueQuantity"]["code"] == "1"
        assert by_code["nodule-presence"]["component"][0]["valueQuantity"]["value"] == (
            pytest.approx(max(expected, 1 - expected), abs=1e-3)
        )
        for observation in observations:
            assert observation["bodySite"]["coding"][0]["code"] == "39607008"
            assert observation["device"]["identifier"]["value"] == "my-model"

        # The second model, on MLServer's stock scikit-learn runtime, over features.
        density = finished[started["dense"]]
        assert density["status"] == "completed", density.get("output")
        assert result_summary(density)["density-class"]["value"] == "dense"
        assert result_summary(density)["density-class"]["probability"] > 0.5

        checked_here = finished[started["mr checked here"]]
        assert checked_here["status"] == "failed"
        assert (
            "reason: request-invalid: service contract my-model: accepts.modality is CT, "
            "the series is MR"
        ) in _error(checked_here)
        wrong_part = finished[started["head"]]
        assert wrong_part["status"] == "failed"
        assert (
            "reason: request-invalid: service contract my-model: accepts.body_part is CHEST, "
            "the series is HEAD"
        ) in _error(wrong_part)
        checked_there = finished[started["mr checked there"]]
        assert checked_there["status"] == "failed"
        assert "(request-invalid)" in _error(checked_there)
        assert "accepts.modality is CT, the series is MR" in _error(checked_there)
        wrong_contract = finished[started["wrong contract"]]
        assert wrong_contract["status"] == "failed"
        assert "(conversion-failed)" in _error(wrong_contract)
        assert (
            "model my-model returned no output 'nodule_score' (contract my-model "
            "outputs.measurements[0].tensor)"
        ) in _error(wrong_contract)

        # Neither the MR study nor the head CT left Hospital_A for a service whose contract it
        # knows: the provider saw four requests, each answered; every Task fits the DSF
        # version's profiles as stored.
        provider_tasks = network.tasks(PROVIDER)
        assert len(provider_tasks) == 4
        assert {t["status"] for t in provider_tasks} == {"completed"}
        for organization in (REQUESTER, PROVIDER):
            validator = network.servers[organization].service.validator
            assert validator is not None
            for task in network.tasks(organization):
                assert validator(task) == [], task["meta"]["profile"]
