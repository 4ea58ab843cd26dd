"""The OMI inference processes end to end: sandbox DSF sites with real bridges, real Orthanc and
real MLServer (session fixtures), the failures each with its own error, and ``dsf-bridge demo``
as a subprocess.

Sites of the failure test: ``Hospital_A`` requests; ``AI_Provider`` runs a bridge and serves
the reference model and its never-ready and always-failing variants; ``Silent_Provider`` has
the plugin's resources on its FHIR server but no bridge (accepts requests, never answers);
``Strict_Provider`` authorizes only another organization for ``inferenceRequest`` (its FHIR
server answers 403); ``Down_Provider`` is in the allow list but its server is not running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydicom.dataset import Dataset

from dsf_bridge.dsf.certificates import publish_certificate
from dsf_bridge.dsf.profiles import TaskProfile
from dsf_bridge.dsf.publication import read_resource
from dsf_bridge.dsf.tasks import input_values
from dsf_bridge.dsf.versions import release
from dsf_bridge.dsf.vocabulary import (
    PROCESS_AUTHORIZATION_ORGANIZATION_EXTENSION,
    READ_ACCESS_TAG_SYSTEM,
)
from dsf_bridge.errors import RemoteError
from dsf_bridge.omi.conversion import MEASUREMENT_CODE_SYSTEM
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.registry import (
    ALGORITHM_EXTENSION,
    DSF_ORGANIZATION_IDENTIFIER_SYSTEM,
    HEARTBEAT_EXTENSION,
    OIP_CONNECTION_TYPE,
    FhirRegistryClient,
)
from dsf_bridge.plugins.inference import (
    CODESYSTEM_OMI,
    EXECUTION_PROCESS,
    REQUEST_PROCESS,
    SERVICE_OMI_REGISTRY,
    result_summary,
)
from dsf_bridge.plugins.inference import plugin as inference_plugin
from dsf_bridge.plugins.placeholders import Placeholders
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess, free_port
from dsf_bridge.sandbox.demo import (
    FAST_RUNTIME,
    InferenceNetwork,
    audit_events,
    plugin_resources,
    waiting_state,
)
from tests.components import BROKEN_MODEL, REFERENCE_MODEL, WARMING_MODEL
from tests.dsf.test_profiles import TASK_BASE
from tests.omi.data import CT_SMALL_PATIENT_VALUES, load_ct_small, make_series
from tests.reference import reference_file

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
# DESIGN 5a: CT_small.dcm, areas in cm2.
CT_SMALL_AREAS = {"body": 56.18, "bone": 4.48, "muscle": 29.60, "adipose": 13.84, "air": 0.24}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def studies(orthanc: OrthancProcess) -> tuple[Dataset, list[Dataset]]:
    """CT_small.dcm and a five-slice series, stored in the session's Orthanc."""
    ct_small = load_ct_small()
    series = make_series(ct_small)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store([ct_small, *series])
    finally:
        archive.close()
    return ct_small, series


def _service(service_id: str, model: str, mlserver: MLServerProcess) -> dict[str, Any]:
    return {"id": service_id, "model_name": model, "inference_url": mlserver.base_url}


def _our_profile(url: str) -> TaskProfile:
    """One of our Task profiles (by canonical with version) over DSF's task-base 1.0.0."""
    name = url.split("|", maxsplit=1)[0].rsplit("/", 1)[-1]
    values = Placeholders("1.1", "2026-11-30", REQUESTER, {})
    path = REPO / "profiles" / "omi" / "StructureDefinition" / f"{name}.json"
    profile = read_resource(path, values.replace_fhir_bytes(path.read_bytes(), source=str(path)))
    base_path = reference_file(TASK_BASE)
    base = read_resource(
        base_path, values.replace_fhir_bytes(base_path.read_bytes(), source=str(base_path))
    )
    return TaskProfile.from_definitions(profile, [base])


def _patient_values(ct_small: Dataset) -> list[str]:
    values = [*CT_SMALL_PATIENT_VALUES, "Pseudonym^Series", "PSN-0001"]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs"):
        value = str(ct_small.get(keyword, "") or "")
        if value:
            values.append(value)
    return values


def _assert_no_patient_identifiers(tasks: list[dict[str, Any]], ct_small: Dataset) -> None:
    text = json.dumps(tasks)
    for value in _patient_values(ct_small):
        assert value not in text, f"patient attribute {value!r} crossed the network in a Task"


@pytest.mark.parametrize("dsf_version", ["2.1", "1.9"], ids=lambda v: f"dsf{v}")
async def test_two_sites_infer_ct_small_and_a_series_end_to_end(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
    studies: tuple[Dataset, list[Dataset]],
    dsf_version: str,
) -> None:
    ct_small, series = studies
    bridges = {
        REQUESTER: {"catalogue": [{"id": "tissue-composition", "organization": PROVIDER}]},
        PROVIDER: {"catalogue": [_service("tissue-composition", REFERENCE_MODEL.name, mlserver)]},
    }
    async with InferenceNetwork(
        tmp_path / "sites", bridges, dsf_release=release(dsf_version)
    ) as network:
        single = await network.request(
            REQUESTER,
            study_instance_uid=str(ct_small.StudyInstanceUID),
            dicomweb_endpoint=orthanc.dicomweb_url,
            service="tissue-composition",
        )
        multi = await network.request(
            REQUESTER,
            study_instance_uid=str(series[0].StudyInstanceUID),
            series_instance_uid=str(series[0].SeriesInstanceUID),
            dicomweb_endpoint=orthanc.dicomweb_url,
            service="tissue-composition",
            segmentation=True,
        )
        finished = await network.finished(REQUESTER, [single, multi], 30)
        await network.settled()

        start = finished[single]
        assert start["status"] == "completed", start.get("output")
        summary = result_summary(start)
        for tissue, area in CT_SMALL_AREAS.items():
            assert summary[f"{tissue}-area"]["unit"] == "cm2"
            assert summary[f"{tissue}-area"]["value"] == pytest.approx(area, abs=0.01), tissue
        assert summary["muscle-mean-hu"]["value"] == pytest.approx(38.3, abs=0.05)
        assert summary["muscle-mean-hu"]["unit"] == "HU"
        assert "muscle-volume" not in summary  # one slice has no volume
        series_start = finished[multi]
        assert series_start["status"] == "completed", series_start.get("output")
        series_summary = result_summary(series_start)
        assert series_summary["muscle-volume"]["unit"] == "mL"
        assert series_summary["muscle-volume"]["value"] > 0
        assert {f"{tissue}-area" for tissue in CT_SMALL_AREAS} <= set(series_summary)
        # Asked for: the label map went into the study as a DICOM SEG; only its UID travelled.
        [seg_uid] = [
            o["valueString"]
            for o in series_start["output"]
            if o["type"]["coding"][0]["code"] == "segmentation-series-instance-uid"
        ]
        archive = DicomWebArchive(orthanc.dicomweb_url)
        try:
            found = await archive.search_series(str(series[0].StudyInstanceUID))
        finally:
            archive.close()
        assert {(s.series_instance_uid, s.modality) for s in found} >= {(seg_uid, "SEG")}
        # The study crossed as a package; the result package brought the SEG's DICOM SR along
        # (docs/omi.md, "DICOM SR measurement report").
        assert [s.modality for s in found].count("SR") == 1
        assert not any(
            o["type"]["coding"][0]["code"] == "segmentation-series-instance-uid"
            for o in start["output"]
        )

        # The result is stored at the requesting site, readable by it alone.
        [reference] = [
            o["valueReference"]["reference"]
            for o in start["output"]
            if o["type"]["coding"][0] == {"system": CODESYSTEM_OMI, "code": "inference-result"}
        ]
        bundle_id = reference.split("/")[1]
        async with network.client(REQUESTER) as client:
            bundle = await client.read("Bundle", bundle_id)
        assert bundle["type"] == "collection"
        assert bundle["meta"]["tag"][0] == {"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"}
        kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
        assert kinds[0] == "DiagnosticReport"
        assert kinds.count("Observation") == 10
        report = bundle["entry"][0]["resource"]
        assert report["imagingStudy"][0]["identifier"]["value"] == (
            f"urn:oid:{ct_small.StudyInstanceUID}"
        )
        async with network.client(PROVIDER) as remote:
            with pytest.raises(RemoteError):
                await remote.request("GET", f"{network.sites[REQUESTER].base_url}/{reference}")

        # Every Task on both sites completed: two start Tasks and two results at Hospital_A,
        # two requests and the SEG package's receipt at AI_Provider; each as sent conforms to
        # our profiles.
        requester_tasks = network.tasks(REQUESTER)
        provider_tasks = network.tasks(PROVIDER)
        assert len(requester_tasks) == 4
        assert len(provider_tasks) == 3
        for task in [*requester_tasks, *provider_tasks]:
            assert task["status"] == "completed", task.get("output")
            _our_profile(task["meta"]["profile"][0]).check(task)
        # ... and, as they are now, against the DSF version's profiles (the sandboxes validate
        # every write; this checks the stored state once more, outputs included).
        for organization, tasks in ((REQUESTER, requester_tasks), (PROVIDER, provider_tasks)):
            validator = network.servers[organization].service.validator
            assert validator is not None
            for task in tasks:
                assert validator(task) == [], task["meta"]["profile"]
        results = [t for t in requester_tasks if t["id"] not in finished]
        assert {input_values(t, "message-name")[0] for t in results} == {"inferenceResult"}
        measured = [
            p
            for p in results[0]["input"]
            if p["type"]["coding"][0]["system"] == MEASUREMENT_CODE_SYSTEM
        ]
        assert all(p["valueQuantity"]["system"] == "http://unitsofmeasure.org" for p in measured)
        requests = [
            t for t in provider_tasks if input_values(t, "message-name") == ["inferenceRequest"]
        ]
        assert {input_values(t, "business-key")[0] for t in requests} == {
            input_values(t, "business-key")[0] for t in results
        }
        # Through DSF by default: a package on Hospital_A's server, never the archive's URL.
        for request in requests:
            assert input_values(request, "dicomweb-endpoint", CODESYSTEM_OMI) == []
            [package] = input_values(request, "study-package", CODESYSTEM_OMI)
            assert package["reference"].startswith(network.sites[REQUESTER].base_url + "/Binary/")
        assert orthanc.dicomweb_url not in json.dumps(provider_tasks)
        _assert_no_patient_identifiers([*requester_tasks, *provider_tasks], ct_small)

        # Nothing waits any more, and each site's audit trail verifies and shows every step.
        for organization, url in network.db_urls.items():
            assert waiting_state(url) == {"running": 0, "timers": 0, "subscriptions": 0}
            assert await audit_events(url) > 10, organization
        actions = {
            organization: _audit_actions(url) for organization, url in network.db_urls.items()
        }
    for action in ("instance.started", "task.sent", "message.correlated", "instance.completed"):
        assert action in actions[REQUESTER], action
    for action in ("instance.started", "handler.completed", "task.sent", "instance.completed"):
        assert action in actions[PROVIDER], action
    assert "instance.failed" not in actions[REQUESTER] | actions[PROVIDER]


def _audit_actions(db_url: str) -> set[str]:
    with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as connection:
        return {row[0] for row in connection.execute("SELECT action FROM audit_events")}


def _strict_resources() -> list[tuple[str, bytes]]:
    """The plugin's resources as a site publishes them that lets only Other_Clinic request."""
    files = []
    for path, original in plugin_resources("Strict_Provider"):
        data = original
        if path.endswith("inference-execution.json"):
            resource = json.loads(original)
            for authorization in resource["extension"]:
                for part in authorization["extension"]:
                    if part["url"] == "requester":
                        part["valueCoding"] = {
                            "extension": [
                                {
                                    "url": PROCESS_AUTHORIZATION_ORGANIZATION_EXTENSION,
                                    "valueIdentifier": {
                                        "system": "http://dsf.dev/sid/organization-identifier",
                                        "value": "Other_Clinic",
                                    },
                                }
                            ],
                            "system": "http://dsf.dev/fhir/CodeSystem/process-authorization",
                            "code": "REMOTE_ORGANIZATION",
                        }
            data = json.dumps(resource).encode()
        files.append((path, data))
    return files


@pytest.mark.parametrize("dsf_version", ["2.1", "1.9"], ids=lambda v: f"dsf{v}")
async def test_failures_end_the_start_task_with_their_own_error(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
    studies: tuple[Dataset, list[Dataset]],
    dsf_version: str,
) -> None:
    ct_small, _ = studies
    catalogue = [
        # The provider fetches the study itself: its archive errors travel back as error kinds.
        {"id": "tissue-composition", "organization": PROVIDER, "transfer": "dicomweb"},
        # Through DSF the requesting site reads its own archive first: nothing is sent.
        {"id": "via-dsf", "organization": PROVIDER},
        {"id": "warming", "organization": PROVIDER},
        {"id": "broken", "organization": PROVIDER},
        {"id": "silent", "organization": "Silent_Provider"},
        {"id": "strict", "organization": "Strict_Provider"},
        {"id": "down", "organization": "Down_Provider"},
    ]
    provider = {
        "catalogue": [
            _service("tissue-composition", REFERENCE_MODEL.name, mlserver),
            _service("warming", WARMING_MODEL.name, mlserver),
            _service("broken", BROKEN_MODEL.name, mlserver),
        ],
    }
    closed_port = free_port()
    study = str(ct_small.StudyInstanceUID)
    cases: dict[str, tuple[dict[str, Any], list[str]]] = {
        "study not in archive": (
            {"study_instance_uid": "1.2.3.4.999", "service": "tissue-composition"},
            ["(study-not-found)", "1.2.3.4.999 is not in the archive"],
        ),
        "archive down": (
            {
                "study_instance_uid": study,
                "service": "tissue-composition",
                "dicomweb_endpoint": f"http://127.0.0.1:{closed_port}/dicom-web",
            },
            ["(archive-unavailable)", f"127.0.0.1:{closed_port}"],
        ),
        "study not in archive, through DSF": (
            {"study_instance_uid": "1.2.3.4.998", "service": "via-dsf"},
            ["request-invalid", "1.2.3.4.998 is not in the archive"],
        ),
        "archive down, through DSF": (
            {
                "study_instance_uid": study,
                "service": "via-dsf",
                "dicomweb_endpoint": f"http://127.0.0.1:{closed_port}/dicom-web",
            },
            ["archive-unavailable", f"127.0.0.1:{closed_port}", "cannot be reached"],
        ),
        "model not ready": (
            {"study_instance_uid": study, "service": "warming"},
            ["(model-not-ready)", WARMING_MODEL.name],
        ),
        "model error": (
            {"study_instance_uid": study, "service": "broken"},
            ["(model-error)", BROKEN_MODEL.name],
        ),
        "provider unreachable": (
            {"study_instance_uid": study, "service": "down"},
            ["request-not-delivered", "not delivered to Down_Provider"],
        ),
        "result not back in time": (
            {"study_instance_uid": study, "service": "silent", "result_timeout": "PT3S"},
            ["result-timeout", "no inference result from Silent_Provider within PT3S"],
        ),
        "requester not authorized": (
            {"study_instance_uid": study, "service": "strict"},
            ["request-not-authorized", "refused by Strict_Provider", "403"],
        ),
        "service unknown": (
            {"study_instance_uid": study, "service": "no-such-service"},
            ["service-unavailable", "no-such-service is not in this site's catalogue"],
        ),
    }
    async with InferenceNetwork(
        tmp_path / "sites",
        {REQUESTER: {"catalogue": catalogue}, PROVIDER: provider},
        published={
            "Silent_Provider": plugin_resources("Silent_Provider"),
            "Strict_Provider": _strict_resources(),
        },
        offline=["Down_Provider"],
        dsf_release=release(dsf_version),
        # Two tries per call ([runtime] call_attempts): the archive that is down fails fast.
        runtime_settings=dataclasses.replace(
            FAST_RUNTIME, call_retry=RetryPolicy(attempts=2, initial_delay=0.5)
        ),
    ) as network:
        # Their bridges ran once (their certificates are published): Silent_Provider's is gone
        # now, Strict_Provider's server refuses us.
        for organization in ("Silent_Provider", "Strict_Provider"):
            async with network.client(organization) as client:
                certificate = network.sites[organization].client_certificate.read_bytes()
                await publish_certificate(client, certificate)
        started = {}
        for label, (inputs, _) in cases.items():
            inputs.setdefault("dicomweb_endpoint", orthanc.dicomweb_url)
            started[await network.request(REQUESTER, **inputs)] = label
        finished = await network.finished(REQUESTER, list(started), 60)
        await network.settled()

        for task_id, task in finished.items():
            label = started[task_id]
            assert task["status"] == "failed", label
            [error] = [
                o["valueString"]
                for o in task.get("output") or []
                if o["type"]["coding"][0]["code"] == "error"
            ]
            for expected in cases[label][1]:
                assert expected in error, f"{label}: {error}"
            assert not any(
                o["type"]["coding"][0]["system"] == MEASUREMENT_CODE_SYSTEM
                for o in task.get("output") or []
            ), label
        errors = [
            o["valueString"]
            for t in finished.values()
            for o in t["output"]
            if o["type"]["coding"][0]["code"] == "error"
        ]
        assert len(set(errors)) == len(cases), "every failure has its own error text"

        # The provider answered every request it took in (with an error) and ended; no
        # instance at either site waits for anything.
        provider_tasks = network.tasks(PROVIDER)
        assert len(provider_tasks) == 4
        assert {t["status"] for t in provider_tasks} == {"completed"}
        assert {t["status"] for t in network.tasks(REQUESTER)} == {"failed"}
        [unanswered] = network.tasks("Silent_Provider")
        assert unanswered["status"] == "requested"
        assert network.tasks("Strict_Provider") == []
        for url in network.db_urls.values():
            assert waiting_state(url) == {"running": 0, "timers": 0, "subscriptions": 0}
            await audit_events(url)
        _assert_no_patient_identifiers(
            [*network.tasks(REQUESTER), *provider_tasks, unanswered], ct_small
        )
    assert (
        REQUEST_PROCESS in inference_plugin.load(organization=REQUESTER, environment={}).definitions
    )
    assert (
        EXECUTION_PROCESS
        in inference_plugin.load(organization=PROVIDER, environment={}).definitions
    )


def _registry_answer(request: httpx.Request) -> httpx.Response:
    """A canned OMI registry: HealthcareService hs-ai (available, by AI_Provider) and hs-off
    (reporting itself unavailable), with their Endpoint, Organization and Device."""
    service_id = request.url.params.get("_id")
    if request.url.path == "/fhir/Device":
        device = {
            "resourceType": "Device",
            "id": "dev1",
            "deviceName": [{"name": REFERENCE_MODEL.name, "type": "model-name"}],
            "version": [{"value": REFERENCE_MODEL.version}],
        }
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": [{"resource": device}]})
    if request.url.path != "/fhir/HealthcareService" or service_id not in ("hs-ai", "hs-off"):
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": []})
    seen = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    status = "available" if service_id == "hs-ai" else "unavailable"
    service = {
        "resourceType": "HealthcareService",
        "id": service_id,
        "active": True,
        "name": f"Tissue composition ({service_id})",
        "providedBy": {"reference": "Organization/org1"},
        "endpoint": [{"reference": "Endpoint/ep1"}],
        "extension": [
            {"url": ALGORITHM_EXTENSION, "valueReference": {"reference": "Device/dev1"}},
            {
                "url": HEARTBEAT_EXTENSION,
                "extension": [
                    {"url": "status", "valueCode": status},
                    {"url": "lastSeen", "valueInstant": seen},
                ],
            },
        ],
    }
    endpoint = {
        "resourceType": "Endpoint",
        "id": "ep1",
        "status": "active",
        "connectionType": {"system": OIP_CONNECTION_TYPE[0], "code": OIP_CONNECTION_TYPE[1]},
        "address": "https://ai.provider.test/oip",
    }
    organization = {
        "resourceType": "Organization",
        "id": "org1",
        "identifier": [{"system": DSF_ORGANIZATION_IDENTIFIER_SYSTEM, "value": PROVIDER}],
    }
    entries = [{"resource": r} for r in (service, endpoint, organization)]
    return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})


async def test_services_from_the_omi_registry_and_their_heartbeat(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
    studies: tuple[Dataset, list[Dataset]],
) -> None:
    """Hospital_A has no catalogue: the registry names the provider; a service whose heartbeat
    says unavailable is not asked at all."""
    ct_small, _ = studies
    registry = FhirRegistryClient(
        "http://registry.test/fhir", transport=httpx.MockTransport(_registry_answer)
    )
    async with (
        registry,
        InferenceNetwork(
            tmp_path / "sites",
            {
                REQUESTER: {},
                PROVIDER: {"catalogue": [_service("hs-ai", REFERENCE_MODEL.name, mlserver)]},
            },
            services={REQUESTER: {SERVICE_OMI_REGISTRY: registry}},
        ) as network,
    ):
        common = {
            "study_instance_uid": str(ct_small.StudyInstanceUID),
            "dicomweb_endpoint": orthanc.dicomweb_url,
        }
        found = await network.request(REQUESTER, service="hs-ai", **common)
        off = await network.request(REQUESTER, service="hs-off", **common)
        finished = await network.finished(REQUESTER, [found, off], 30)
        await network.settled()
    assert finished[found]["status"] == "completed", finished[found].get("output")
    summary = result_summary(finished[found])
    assert summary["muscle-area"]["value"] == pytest.approx(CT_SMALL_AREAS["muscle"], abs=0.01)
    assert finished[off]["status"] == "failed"
    [error] = [o["valueString"] for o in finished[off]["output"]]
    assert "service-unavailable" in error
    assert "reports itself unavailable" in error
    assert len(network.tasks(PROVIDER)) == 1  # only hs-ai reached the provider


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            writer.close()


@contextlib.asynccontextmanager
async def _tls_front(
    orthanc: OrthancProcess, ca: CertificateAuthority, directory: Path
) -> AsyncIterator[tuple[str, list[str]]]:
    """Orthanc behind a TLS terminator that demands a client certificate of ``ca`` (Debian's
    Orthanc crashes on HTTPS itself); yields the https DICOMweb URL and the clients seen."""
    ca.write(directory / "ca.pem")
    ca.issue_server("localhost").write(directory / "server.pem", directory / "server.key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(directory / "ca.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(directory / "server.pem"), str(directory / "server.key"))
    upstream = urlsplit(orthanc.base_url)
    clients: list[str] = []

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        clients.append(dict(item[0] for item in peer.get("subject", ())).get("commonName", ""))
        up_reader, up_writer = await asyncio.open_connection(upstream.hostname, upstream.port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    proxy = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=context)
    port = proxy.sockets[0].getsockname()[1]
    try:
        yield f"https://localhost:{port}/dicom-web", clients
    finally:
        proxy.close()
        await proxy.wait_closed()


async def test_the_provider_fetches_over_mutual_tls_with_its_dsf_identity(
    tmp_path: Path,
    orthanc: OrthancProcess,
    mlserver: MLServerProcess,
    studies: tuple[Dataset, list[Dataset]],
) -> None:
    ct_small, _ = studies
    ca = CertificateAuthority("OMI mTLS test CA")
    (tmp_path / "front").mkdir()
    bridges = {
        # The provider fetches the study itself from the archive behind mutual TLS.
        REQUESTER: {
            "catalogue": [
                {"id": "tissue-composition", "organization": PROVIDER, "transfer": "dicomweb"}
            ]
        },
        PROVIDER: {"catalogue": [_service("tissue-composition", REFERENCE_MODEL.name, mlserver)]},
    }
    async with (
        _tls_front(orthanc, ca, tmp_path / "front") as (url, clients),
        InferenceNetwork(tmp_path / "sites", bridges, ca=ca) as network,
    ):
        task_id = await network.request(
            REQUESTER,
            study_instance_uid=str(ct_small.StudyInstanceUID),
            dicomweb_endpoint=url,
            service="tissue-composition",
        )
        finished = await network.finished(REQUESTER, [task_id], 30)
    assert finished[task_id]["status"] == "completed", finished[task_id].get("output")
    summary = result_summary(finished[task_id])
    assert summary["body-area"]["value"] == pytest.approx(CT_SMALL_AREAS["body"], abs=0.01)
    assert clients and set(clients) == {f"{PROVIDER} client"}


@pytest.mark.parametrize("dsf_version", ["2.1", "1.9"], ids=lambda v: f"dsf{v}")
def test_demo_json_prints_the_reference_values(tmp_path: Path, dsf_version: str) -> None:
    """``dsf-bridge demo --json`` as a user runs it: its own Orthanc, MLServer and sites,
    against sandbox servers of DSF 2.1 (the default) and 1.9."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    version = [] if dsf_version == "2.1" else ["--dsf-version", dsf_version]
    done = subprocess.run(
        [sys.executable, "-m", "dsf_bridge", "demo", "--json", "--timeout", "60", *version],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = json.loads(done.stdout)
    single, series, dense = output["results"]
    assert single["status"] == series["status"] == dense["status"] == "completed"
    # The second model, on MLServer's stock scikit-learn runtime: a class and its probability.
    assert dense["measurements"]["density-class"]["value"] == "dense"
    assert dense["measurements"]["density-class"]["probability"] > 0.5
    for tissue, area in CT_SMALL_AREAS.items():
        assert single["measurements"][f"{tissue}-area"]["value"] == pytest.approx(area, abs=0.01)
        assert single["measurements"][f"{tissue}-area"]["unit"] == "cm2"
        assert series["measurements"][f"{tissue}-volume"]["unit"] == "mL"
    assert single["study_instance_uid"] == str(load_ct_small().StudyInstanceUID)
    # Through DSF by default: the encrypted package of each study crossed, and how fast.
    for result in (single, series):
        assert result["transfer"]["bytes"] > 30_000
        assert result["transfer"]["seconds"] > 0
    assert series["transfer"]["bytes"] > 4 * single["transfer"]["bytes"]
    assert "completed" in done.stderr  # progress went to stderr
    assert f"DSF {dsf_version}.0 sandbox FHIR server" in done.stderr
    assert list(tmp_path.iterdir()) == []  # the demo removed its temporary directory


@pytest.mark.parametrize("result_timeout", ["P9999Y", "P99999999999D", "P13M"])
async def test_a_result_timeout_beyond_the_bound_fails_the_request(
    tmp_path: Path, result_timeout: str
) -> None:
    """Issue 10: a start Task's result-timeout of P9999Y (a timer past the year 9999) crashed
    the bridge. Durations from Tasks are bounded: the request fails before anything is sent."""
    catalogue = [{"id": "silent", "organization": "Silent_Provider"}]
    async with InferenceNetwork(
        tmp_path / "sites",
        {REQUESTER: {"catalogue": catalogue}},
        published={"Silent_Provider": plugin_resources("Silent_Provider")},
    ) as network:
        task_id = await network.request(
            REQUESTER,
            study_instance_uid="1.2.3.4",
            service="silent",
            dicomweb_endpoint="http://127.0.0.1:1/dicom-web",
            result_timeout=result_timeout,
        )
        finished = await network.finished(REQUESTER, [task_id], 20)
        [error] = [
            o["valueString"]
            for o in finished[task_id].get("output") or []
            if o["type"]["coding"][0]["code"] == "error"
        ]
        assert finished[task_id]["status"] == "failed"
        assert "request-invalid: input 'result-timeout'" in error
        assert network.tasks("Silent_Provider") == []  # nothing was sent
