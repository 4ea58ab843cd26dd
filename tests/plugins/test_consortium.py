"""Issue 14 end to end: one consortium request, four data sites, aggregates only (sandbox DSF
sites with real bridges, a real Orthanc at every data site, real MLServer).

Sites: ``Coordinator`` asks; ``Site_A`` and ``Site_B`` hold enough studies to report;
``Site_C`` holds fewer than k (its cells come back suppressed); ``Site_D`` wants every request
approved and nobody approves, so the coordinator records it ``timed-out``. Every study is its
own synthetic patient.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from dsf_bridge.api.app import create_app
from dsf_bridge.api.diagram import DiagramLibrary
from dsf_bridge.cli import app as cli_app
from dsf_bridge.config import ApiSettings
from dsf_bridge.dsf.tasks import input_values
from dsf_bridge.dsf.versions import release
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
from dsf_bridge.store import Database
from tests.components import REFERENCE_MODEL, json_logs, running

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
    """Every log line of the test, as JSON lines."""
    with json_logs("info") as out:
        yield out


def _identifiers(datasets: list[Dataset]) -> set[str]:
    found: set[str] = set()
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
            found.add(str(ds[keyword].value))
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
            coordinator_db_url = network.db_urls[COORDINATOR]
            coordinator_db = _database_text(coordinator_db_url)
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
    await _progress_is_shown(coordinator_db_url)


async def _progress_is_shown(db_url: str) -> None:
    """The coordinator's instance page and ``instances show`` list every site's state."""
    connection = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        [(instance_id,)] = connection.execute(
            "SELECT i.id FROM process_instances i JOIN process_definitions d "
            "ON d.id = i.definition_id WHERE d.process_key = ?",
            (COORDINATOR_PROCESS,),
        ).fetchall()
    finally:
        connection.close()
    database = Database(db_url, read_only=True)
    try:
        app = create_app(
            database,
            ApiSettings(token=SecretStr("consortium-page-token")),
            site=COORDINATOR,
            diagrams=DiagramLibrary([consortium_plugin]),
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            page = await client.get(
                f"/ui/instances/{instance_id}", auth=("admin", "consortium-page-token")
            )
    finally:
        await database.dispose()
    assert page.status_code == 200
    table = page.text.split('id="progress"', 1)[1].split("</table>", 1)[0]
    assert "<td>Site_D</td><td>timed-out</td><td>no answer within PT8S</td>" in table
    assert "<td>Site_C</td><td>suppressed</td>" in table
    shown = await asyncio.to_thread(  # the CLI runs its own event loop
        CliRunner().invoke, cli_app, ["instances", "show", instance_id, "--db-url", db_url]
    )
    assert shown.exit_code == 0, shown.output
    assert "progress      Site_D  timed-out  no answer within PT8S" in shown.output


def _outputs(task: dict[str, Any], code: str) -> list[Any]:
    return [
        next(v for k, v in o.items() if k.startswith("value"))
        for o in task.get("output") or []
        if o["type"]["coding"][0]["code"] == code
    ]


async def test_refusals_failures_and_invalid_requests_each_with_its_reason(
    tmp_path: Path, orthanc: OrthancProcess, mlserver: MLServerProcess
) -> None:
    """``Closed_Site`` takes no consortium requests; ``Other_Site`` does not run the service;
    ``Nowhere`` is not in the allow list. Requests the coordinator cannot run at all fail."""
    catalogue = [{"id": "ct-density", "contract": "ct-density", "inference_url": mlserver.base_url}]
    bridges: dict[str, dict[str, Any]] = {
        COORDINATOR: {},
        "Closed_Site": {},
        "Other_Site": {
            "catalogue": catalogue,
            "consortium": {"dicomweb_url": orthanc.dicomweb_url},
        },
    }
    async with InferenceNetwork(
        tmp_path / "sites", bridges, dsf_release=release("2.1"), plugins=(consortium_plugin,)
    ) as network:
        tasks = {
            "partial": consortium_start_task(
                COORDINATOR, service=SERVICE, targets=["Closed_Site", "Other_Site", "Nowhere"]
            ),
            # No site can be sent to: a multi-instance over no target, still a merged result.
            "nobody": consortium_start_task(COORDINATOR, service=SERVICE, targets=["Nowhere"]),
            # A cohort is a query: an identifying input is refused, not ignored.
            "identifying": consortium_start_task(
                COORDINATOR,
                service=SERVICE,
                targets=["Closed_Site"],
                extra_inputs=[
                    {"system": CODESYSTEM_CONSORTIUM, "code": "patient-id", "value": "PID-1"}
                ],
            ),
            "no-contract": consortium_start_task(
                COORDINATOR, service="unknown-service", targets=["Closed_Site"]
            ),
            "both-targets": consortium_start_task(
                COORDINATOR,
                service=SERVICE,
                targets=["Closed_Site"],
                parent="Research_Network",
                role=("http://dsf.dev/fhir/CodeSystem/organization-role", "DIC"),
            ),
            "wrong-modality": consortium_start_task(
                COORDINATOR, service=SERVICE, modalities=["MR"], targets=["Closed_Site"]
            ),
        }
        ids = {}
        async with network.client(COORDINATOR) as client:
            for name, task in tasks.items():
                created = await client.create(task)
                assert created.id is not None
                ids[name] = created.id
        finished = await network.finished(COORDINATOR, list(ids.values()), 60)
        await network.settled()

    partial = finished[ids["partial"]]
    assert partial["status"] == "completed", partial.get("output")
    assert _outputs(partial, "sites-done") == [0]
    assert _outputs(partial, "sites-missing") == [3]
    statuses = sorted(_outputs(partial, "site-status"))
    assert statuses[0] == (
        "Closed_Site: refused (this site takes no consortium requests ([omi.consortium] "
        "dicomweb_url))"
    )
    assert statuses[1] == "Nowhere: failed (request not sent: not in the allow list)"
    assert statuses[2] == "Other_Site: refused (service tissue-composition is not run at this site)"
    nobody = finished[ids["nobody"]]
    assert nobody["status"] == "completed", nobody.get("output")
    assert (_outputs(nobody, "sites-done"), _outputs(nobody, "sites-missing")) == ([0], [1])
    assert _outputs(nobody, "site-status") == [
        "Nowhere: failed (request not sent: not in the allow list)"
    ]
    assert len(_outputs(nobody, "consortium-result")) == 1

    def error(name: str) -> str:
        task = finished[ids[name]]
        assert task["status"] == "failed", name
        return str(_outputs(task, "error")[0])

    # DSF itself refuses it first: the input follows no slice of the profile, and the
    # business-key the bridge adds when it takes the Task in comes after it (openAtEnd).
    assert "matches no slice" in error("identifying")
    assert "service 'unknown-service' has no contract at this site" in error("no-contract")
    assert "not both" in error("both-targets")
    assert "accepts CT, not MR" in error("wrong-modality")


# On DSF 1.9: the other end-to-end tests here run against 2.1 (CI time).
@pytest.mark.parametrize("dsf_version", ["1.9"], ids=lambda v: f"dsf{v}")
async def test_sites_by_role_under_a_parent_and_an_approval_given_in_the_questionnaire(
    tmp_path: Path, orthanc: OrthancProcess, mlserver: MLServerProcess, dsf_version: str
) -> None:
    """Targets: every organization with role DIC under ``Research_Network`` (``Site_P`` and
    ``Site_Q``; ``Site_R`` is HRP and not asked). ``Site_P`` wants each request approved: its
    administrator approves in the QuestionnaireResponse the bridge created. Both sites read the
    same archive, the cohort is this test's series description."""
    marker = f"CONSORTIUM-ROLE-{uuid.uuid4().hex[:12]}"  # the session's archive is shared
    studies = synthetic_studies(5, offset_hu=20.0)
    for ds in studies:
        ds.SeriesDescription = marker
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store(studies)
    finally:
        archive.close()
    site: dict[str, Any] = {
        "catalogue": [
            {"id": SERVICE, "model_name": REFERENCE_MODEL.name, "inference_url": mlserver.base_url}
        ],
        "consortium": {"dicomweb_url": orthanc.dicomweb_url},
    }
    bridges: dict[str, dict[str, Any]] = {
        COORDINATOR: {},
        "Site_P": site | {"consortium": {**site["consortium"], "approval": True}},
        "Site_Q": site,
        "Site_R": site,
    }
    async with InferenceNetwork(
        tmp_path / "sites",
        bridges,
        dsf_release=release(dsf_version),
        plugins=(consortium_plugin,),
        consortium={"Research_Network": {"Site_P": ["DIC"], "Site_Q": ["DIC"], "Site_R": ["HRP"]}},
    ) as network:
        async with network.client(COORDINATOR) as client:
            created = await client.create(
                consortium_start_task(
                    COORDINATOR,
                    service=SERVICE,
                    parent="Research_Network",
                    role=("http://dsf.dev/fhir/CodeSystem/organization-role", "DIC"),
                    series_description=marker,
                )
            )
        assert created.id is not None
        # Site_P's administrator finds the form and approves.
        response = None
        for _ in range(200):
            found = [
                r
                for r in network.resources("Site_P", "QuestionnaireResponse")
                if r.get("status") == "in-progress"
            ]
            if found:
                response = found[0]
                break
            await asyncio.sleep(0.1)
        assert response is not None, "no approval form at Site_P"
        assert response["questionnaire"].startswith(
            "http://dsf-bridge.dev/fhir/Questionnaire/consortium-approval|"
        )
        # The form shows the request: who asks, which service, which cohort, which k.
        [shown] = [i["text"] for i in response["item"] if i["linkId"] == "request"]
        assert shown.startswith(
            "Coordinator asks this site to run the service tissue-composition on every study"
        )
        assert f"series description '{marker}'" in shown
        assert "fewer than 5 studies" in shown
        response["status"] = "completed"
        response["authored"] = "2026-11-30T10:00:00.000Z"
        response["item"] = [
            {**item, "answer": [{"valueBoolean": True}]} if item["linkId"] == "approve" else item
            for item in response["item"]
        ]
        async with network.client("Site_P") as client:
            await client.update(response)
        finished = await network.finished(COORDINATOR, [created.id], 60)
        await network.settled()
        [variables] = instance_variables(network.db_urls[COORDINATOR], COORDINATOR_PROCESS)
        site_r_tasks = network.tasks("Site_R")

    start = finished[created.id]
    assert start["status"] == "completed", start.get("output")
    states = {state["organization"]: state["status"] for state in site_states(variables)}
    assert states == {"Site_P": "done", "Site_Q": "done"}
    assert site_r_tasks == []
    merged = consortium_result(variables)
    assert merged is not None
    assert merged["pooled"]["body-area"]["n"] == 10  # the same five studies, at both sites


def test_demo_consortium_json_lists_every_site_and_the_pooled_figures(tmp_path: Path) -> None:
    """``dsf-bridge demo --consortium --json`` as a user runs it (its own Orthancs, MLServer
    and four sites): Hospital_A reports, Hospital_B is below k, Hospital_C times out."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "dsf_bridge", "demo", "--consortium", "--json", "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = json.loads(done.stdout)
    assert output["status"] == "completed"
    sites = {site["organization"]: site for site in output["sites"]}
    assert {name: site["status"] for name, site in sites.items()} == {
        "Hospital_A": "done",
        "Hospital_B": "suppressed",
        "Hospital_C": "timed-out",
    }
    assert sites["Hospital_C"]["reason"] == "no answer within PT10S"
    assert all(a["suppressed"] for a in sites["Hospital_B"]["aggregates"])
    area = output["pooled"]["body-area"]
    assert area["n"] == 10 and area["sites"] == ["Hospital_A"]
    assert area["quartiles"]["n"] == 10  # 2k studies: quartiles shown
    assert area["suppressed_at"] == ["Hospital_B"]
    [shown] = [a for a in sites["Hospital_A"]["aggregates"] if a["measurement"] == "body-area"]
    assert (area["mean"], area["sd"]) == (shown["mean"], shown["sd"])  # one site: its figures
    assert output["result"].startswith("Bundle/")
    assert list(tmp_path.iterdir()) == []  # the demo removed its temporary directory
