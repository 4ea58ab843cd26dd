"""Issue 14 end to end: one consortium request, four data sites, aggregates only (sandbox DSF
sites with real bridges, a real Orthanc at every data site, real MLServer).

Sites: ``Coordinator`` asks; ``Site_A`` and ``Site_B`` hold enough studies to report;
``Site_C`` holds fewer than k (its cells come back suppressed); ``Site_D`` wants every request
approved and nobody approves, so the coordinator records it ``timed-out``. Every study is its
own synthetic patient.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from pydicom.dataset import Dataset

from dsf_bridge.dsf.tasks import input_values
from dsf_bridge.dsf.versions import release
from dsf_bridge.logs import configure_logging
from dsf_bridge.omi.contract import contract_of
from dsf_bridge.omi.conversion import Measurement
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.execution import infer_study
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.plugins.consortium import (
    CODESYSTEM_CONSORTIUM,
    COORDINATOR_PROCESS,
    consortium_result,
    site_states,
)
from dsf_bridge.plugins.consortium import plugin as consortium_plugin
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.consortium import (
    consortium_start_task,
    instance_variables,
    synthetic_studies,
)
from dsf_bridge.sandbox.demo import InferenceNetwork, audit_events
from tests.components import REFERENCE_MODEL, running

COORDINATOR = "Coordinator"
# (organization, studies, HU offset, approval)
DATA_SITES = (
    ("Site_A", 6, -40.0, False),
    ("Site_B", 5, 35.0, False),
    ("Site_C", 3, 0.0, False),
    ("Site_D", 5, 10.0, True),
)
SERVICE = "tissue-composition"


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line of every bridge in the test, as JSON lines."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    yield out
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    structlog.reset_defaults()


def _identifiers(datasets: list[Dataset]) -> set[str]:
    found: set[str] = set()
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
            found.add(str(ds.data_element(keyword).value))
        found.add(str(ds.PatientName))
        found.add(str(ds.PatientName).replace("^", " "))
    return found


def _database_text(db_url: str) -> str:
    """Every row of every table of a bridge's SQLite store, as text."""
    path = db_url.removeprefix("sqlite:///")
    connection = sqlite3.connect(path)
    try:
        tables = [
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return "\n".join(
            repr(row) for table in tables for row in connection.execute(f'SELECT * FROM "{table}"')
        )
    finally:
        connection.close()


async def _direct_values(
    orthanc: OrthancProcess, mlserver: MLServerProcess, studies: list[Dataset]
) -> dict[str, list[float]]:
    """Every measurement of every study, inferred one by one without any consortium code."""
    contract = contract_of(SERVICE)
    assert contract is not None
    values: dict[str, list[float]] = {}
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        async with HttpInferenceClient(mlserver.base_url) as client:
            for ds in studies:
                outcome = await infer_study(
                    archive,
                    client,
                    study_instance_uid=str(ds.StudyInstanceUID),
                    contract=contract,
                    model=REFERENCE_MODEL.name,
                    device={"type": "Device", "display": "test"},
                )
                for finding in outcome.findings:
                    if isinstance(finding, Measurement) and finding.value is not None:
                        values.setdefault(finding.code.code, []).append(finding.value)
    finally:
        archive.close()
    return values


async def test_one_request_four_sites_partial_result_k_rule_and_exact_pooling(
    tmp_path: Path, mlserver: MLServerProcess, logs: io.StringIO
) -> None:
    all_studies: list[Dataset] = []
    site_studies: dict[str, list[Dataset]] = {}
    with contextlib.ExitStack() as stack:
        bridges: dict[str, dict[str, Any]] = {COORDINATOR: {"consortium": {"site_timeout": "PT8S"}}}
        archives: dict[str, OrthancProcess] = {}
        for organization, count, offset, approval in DATA_SITES:
            orthanc = stack.enter_context(
                contextlib.contextmanager(running)(OrthancProcess(tmp_path / organization))
            )
            archives[organization] = orthanc
            studies = synthetic_studies(count, offset_hu=offset)
            archive = DicomWebArchive(orthanc.dicomweb_url)
            try:
                await archive.store(studies)
            finally:
                archive.close()
            site_studies[organization] = studies
            all_studies.extend(studies)
            bridges[organization] = {
                "catalogue": [
                    {
                        "id": SERVICE,
                        "model_name": REFERENCE_MODEL.name,
                        "inference_url": mlserver.base_url,
                    }
                ],
                "consortium": {"dicomweb_url": orthanc.dicomweb_url, "approval": approval},
            }
        async with InferenceNetwork(
            tmp_path / "sites",
            bridges,
            dsf_release=release("2.1"),
            plugins=(consortium_plugin,),
        ) as network:
            async with network.client(COORDINATOR) as client:
                created = await client.create(
                    consortium_start_task(
                        COORDINATOR,
                        service=SERVICE,
                        targets=[name for name, *_ in DATA_SITES],
                        study_date_from="2000-01-01",
                        minimum_k=5,
                    )
                )
            assert created.id is not None
            finished = await network.finished(COORDINATOR, [created.id], 60)
            start = finished[created.id]
            assert start["status"] == "completed", start.get("output")
            [variables] = instance_variables(network.db_urls[COORDINATOR], COORDINATOR_PROCESS)
            coordinator_resources = [
                resource
                for resource_type in ("Task", "Bundle", "Binary", "DocumentReference")
                for resource in network.resources(COORDINATOR, resource_type)
            ]
            coordinator_db = _database_text(network.db_urls[COORDINATOR])
            coordinator_tasks = network.tasks(COORDINATOR)
            assert await audit_events(network.db_urls[COORDINATOR]) > 10

        direct = {
            name: await _direct_values(archives[name], mlserver, site_studies[name])
            for name in ("Site_A", "Site_B")
        }

    # Every site with its state: a partial result is a result.
    states = {state["organization"]: state for state in site_states(variables)}
    assert {name: state["status"] for name, state in states.items()} == {
        "Site_A": "done",
        "Site_B": "done",
        "Site_C": "suppressed",
        "Site_D": "timed-out",
    }
    assert states["Site_D"]["reason"] == "no answer within PT8S"
    outputs = {
        o["type"]["coding"][0]["code"]: o
        for o in start["output"]
        if o["type"]["coding"][0]["system"] == CODESYSTEM_CONSORTIUM
    }
    assert outputs["sites-done"]["valueUnsignedInt"] == 3
    assert outputs["sites-missing"]["valueUnsignedInt"] == 1
    statuses = [
        o["valueString"] for o in start["output"] if o["type"]["coding"][0]["code"] == "site-status"
    ]
    assert "Site_D: timed-out (no answer within PT8S)" in statuses

    merged = consortium_result(variables)
    assert merged is not None
    sites = {site["organization"]: site for site in merged["sites"]}
    # Site_C: every cell suppressed, no figure at all, nothing pooled from it.
    assert sites["Site_C"]["aggregates"]
    assert all(
        a == {**a, "suppressed": True} and "n" not in a for a in sites["Site_C"]["aggregates"]
    )
    # The pooled mean and sd equal those over all studies of the contributing sites at once.
    for measurement, pooled in merged["pooled"].items():
        values = np.asarray(direct["Site_A"][measurement] + direct["Site_B"][measurement])
        assert pooled["n"] == len(values) == 11, measurement
        assert pooled["mean"] == pytest.approx(float(values.mean()), rel=1e-9, abs=1e-9)
        assert pooled["sd"] == pytest.approx(float(values.std(ddof=1)), rel=1e-9, abs=1e-9)
        assert pooled["sites"] == ["Site_A", "Site_B"]
        assert pooled["suppressed_at"] == ["Site_C"]
    assert merged["pooled"], "nothing was pooled"

    # What Site_C sent the coordinator: only 'suppressed', no count to subtract from.
    [c_result] = [
        t
        for t in coordinator_tasks
        if input_values(t, "message-name") == ["consortiumInferenceResult"]
        and t["requester"]["identifier"]["value"] == "Site_C"
    ]
    [sent] = input_values(c_result, "consortium-aggregates", CODESYSTEM_CONSORTIUM)
    assert all(set(a) == {"measurement", "kind", "suppressed"} for a in json.loads(sent))

    # The stored Bundle: Site_C's cells masked, without a value.
    [reference] = [outputs["consortium-result"]["valueReference"]["reference"]]
    [bundle] = [r for r in coordinator_resources if f"Bundle/{r.get('id')}" == reference]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        performers = [p["identifier"]["value"] for p in resource.get("performer") or []]
        if performers == ["Site_C"] and resource.get("component"):
            for component in resource["component"]:
                assert (
                    not any(key.startswith("value") for key in component)
                    or component["code"]["coding"][0]["code"] == "site-status"
                )

    # No study or patient identifier of any data site at the coordinator: not in its Tasks,
    # its stored resources, its store; not in any log line of any bridge.
    secrets = _identifiers(all_studies)
    haystacks = {
        "coordinator resources": json.dumps(coordinator_resources),
        "coordinator store": coordinator_db,
        "log": logs.getvalue(),
    }
    for where, text in haystacks.items():
        leaked = sorted(secret for secret in secrets if secret in text)
        assert not leaked, f"{where} holds {leaked[:3]}"
    assert "consortium.merged" in logs.getvalue()
