"""The OMI inference demo and its network: sandbox DSF sites with running bridges, real Orthanc
and real MLServer, on one machine (``dsf-bridge demo``; tests build the same network).

:class:`InferenceNetwork` serves every organization's sandbox DSF FHIR server (each with its
own certificates), runs a :class:`~dsf_bridge.runtime.daemon.Bridge` with its own SQLite store
(or the database a test names) for the organizations that have one, and can publish the
inference plugin's resources to servers without a bridge (a site that accepts requests and
never answers). Organizations listed as ``offline`` are in the allow list but serve nothing.

:func:`run_demo` is the command: ``Hospital_A`` asks ``AI_Provider`` for the tissue composition
of ``CT_small.dcm`` (from the pydicom wheel) and of a five-slice series made from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import json
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pydicom
from pydantic import SecretStr
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text

from dsf_bridge.api import ApiServer, create_app
from dsf_bridge.api.diagram import DiagramLibrary
from dsf_bridge.config import ApiSettings, load_settings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.publication import publish
from dsf_bridge.dsf.tasks import build_task
from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.errors import BridgeError
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.plugins.api import ProcessPlugin
from dsf_bridge.plugins.inference import (
    CODESYSTEM_OMI,
    STUDY_PACKAGE_BYTES,
    STUDY_PACKAGE_SECONDS,
    result_summary,
)
from dsf_bridge.plugins.inference import plugin as inference_plugin
from dsf_bridge.runtime.daemon import Bridge
from dsf_bridge.runtime.processes import RuntimeSettings
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.components import (
    DENSITY_MODEL,
    REFERENCE_MODEL,
    ComponentMissingError,
    MLServerProcess,
    OrthancProcess,
)
from dsf_bridge.sandbox.network import _free_ports
from dsf_bridge.sandbox.refmodel.density import shifted
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import Consortium, SiteFiles, build_service, init_sandbox
from dsf_bridge.store import Database, create_sync_engine, upgrade, verify_chain

__all__ = [
    "DEMO_PROVIDER",
    "DEMO_REQUESTER",
    "DemoResult",
    "InferenceNetwork",
    "audit_events",
    "audit_summary",
    "demo_workdir",
    "make_series",
    "plugin_resources",
    "run_demo",
    "start_task",
    "waiting_state",
]

DEMO_REQUESTER = "Hospital_A"
DEMO_PROVIDER = "AI_Provider"
SERVICE_ID = "tissue-composition"
# The second model of the demo: a scikit-learn classifier with the shipped contract ct-density.
DENSITY_SERVICE_ID = "ct-density"
START_PROFILE = "http://dsf-bridge.dev/fhir/StructureDefinition/task-start-inference-request|1.1"
START_CANONICAL = "http://dsf-bridge.dev/bpe/Process/inferenceRequest|1.1"
# Short waits between worker rounds: a sandbox network should answer in about a second.
FAST_RUNTIME = RuntimeSettings(
    idle_poll=dt.timedelta(milliseconds=100),
    outbox_retry_delays=(dt.timedelta(milliseconds=200),),
    job_retry_delay=dt.timedelta(milliseconds=200),
)


def plugin_resources(
    organization: str, plugin: ProcessPlugin = inference_plugin
) -> list[tuple[str, bytes]]:
    """The plugin's FHIR resources as a bridge at ``organization`` publishes them."""
    loaded = plugin.load(organization=organization, environment={})
    files = {str(path): data for entries in loaded.resources.values() for path, data in entries}
    return list(files.items())


def start_task(
    organization: str,
    *,
    study_instance_uid: str,
    dicomweb_endpoint: str,
    service: str | None = None,
    series_instance_uid: str | None = None,
    result_timeout: str | None = None,
    segmentation: bool = False,
    service_modality: str | None = None,
    service_body_part: str | None = None,
    service_task: str | None = None,
) -> dict[str, Any]:
    """A ``startInferenceRequest`` Task as a clinician or the FHIR UI would create it: naming a
    ``service``, or what it must offer (``service_modality``, ...: the OMI registry is
    searched)."""
    inputs: list[dict[str, object]] = [
        {"system": CODESYSTEM_OMI, "code": "study-instance-uid", "value": study_instance_uid}
    ]
    if series_instance_uid is not None:
        inputs.append(
            {"system": CODESYSTEM_OMI, "code": "series-instance-uid", "value": series_instance_uid}
        )
    inputs.append(
        {"system": CODESYSTEM_OMI, "code": "dicomweb-endpoint", "value": dicomweb_endpoint}
    )
    for code, value in (
        ("service", service),
        ("service-modality", service_modality),
        ("service-body-part", service_body_part),
        ("service-task", service_task),
    ):
        if value is not None:
            inputs.append({"system": CODESYSTEM_OMI, "code": code, "value": value})
    if result_timeout is not None:
        inputs.append({"system": CODESYSTEM_OMI, "code": "result-timeout", "value": result_timeout})
    if segmentation:
        inputs.append({"system": CODESYSTEM_OMI, "code": "segmentation", "value": True})
    return build_task(
        instantiates_canonical=START_CANONICAL,
        message_name="startInferenceRequest",
        profile=START_PROFILE,
        business_key=None,
        correlation_key=None,
        requester=organization,
        recipient=organization,
        inputs=inputs,
        authored_on=dt.datetime.now(dt.UTC),
    )


def site_client(site: SiteFiles) -> FhirClient:
    """A client of a site's own FHIR server, with the site's identity."""
    identity = load_identity(site.client_certificate, site.client_key)
    return FhirClient(site.base_url, ssl_context=build_ssl_context(identity, [site.ca]))


@dataclass
class InferenceNetwork:
    """Sandbox sites: ``bridges`` maps an organization to its ``[omi]`` settings (a bridge runs
    there), ``published`` to plugin resources put on a server without a bridge, ``offline``
    organizations are in the allow list only; ``services`` adds handler services per bridge;
    ``databases`` gives a bridge's store URL (default: an SQLite file in the site's folder);
    ``pseudonymization`` overrides a bridge's ``[pseudonymization]`` (default: a random
    secret per site)."""

    directory: Path
    bridges: Mapping[str, Mapping[str, Any]]
    published: Mapping[str, Sequence[tuple[str, bytes]]] = field(default_factory=dict)
    offline: Sequence[str] = ()
    services: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    databases: Mapping[str, str] = field(default_factory=dict)
    pseudonymization: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ca: CertificateAuthority | None = None
    runtime_settings: RuntimeSettings = FAST_RUNTIME
    dsf_release: DsfRelease = DSF_2
    # True: DSF's profiles must be found (tests); None: validate if they are (the demo).
    validate: bool | None = True
    # The plugins every bridge runs (default: OMI inference).
    plugins: Sequence[ProcessPlugin] = (inference_plugin,)
    # Parent organizations and their members' roles in the allow list (OrganizationAffiliation).
    consortium: Consortium | None = None
    sites: dict[str, SiteFiles] = field(default_factory=dict)
    servers: dict[str, SandboxServer] = field(default_factory=dict)
    running: dict[str, Bridge] = field(default_factory=dict)
    db_urls: dict[str, str] = field(default_factory=dict)
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _runners: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def organizations(self) -> list[str]:
        names = [*self.bridges, *self.published, *self.offline]
        return list(dict.fromkeys(names))

    async def __aenter__(self) -> InferenceNetwork:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _start(self) -> None:
        organizations = self.organizations
        ports = _free_ports(len(organizations))
        ca = self.ca or CertificateAuthority("dsf-bridge OMI sandbox CA")
        sites = init_sandbox(
            self.directory,
            organizations,
            ports=ports,
            ca=ca,
            dsf_release=self.dsf_release,
            consortium=self.consortium,
        )
        self.sites = {site.organization: site for site in sites}
        allow_list: dict[str, Any] = json.loads(sites[0].allow_list.read_text())
        for site in sites:
            if site.organization in self.offline:
                continue
            service = build_service(
                site.organization,
                allow_list,
                site.base_url,
                dsf_release=self.dsf_release,
                validate=self.validate,
            )
            self.servers[site.organization] = await self._stack.enter_async_context(
                SandboxServer(
                    service,
                    certificate=site.server_certificate,
                    key=site.server_key,
                    ca_files=[site.ca],
                    port=site.port,
                )
            )
        for organization, files in self.published.items():
            async with site_client(self.sites[organization]) as client:
                await publish(client, list(files), dsf_release=self.dsf_release)
        for organization, omi in self.bridges.items():
            site = self.sites[organization]
            url = self.databases.get(organization) or (
                f"sqlite:///{(self.directory / organization / 'bridge.db').resolve()}"
            )
            upgrade(url)
            settings = load_settings(
                site.bridge_config,
                overrides={
                    "db": {"url": url},
                    "log": {"level": "warning"},
                    "omi": dict(omi),
                    # Each site its own key for replacement UIDs (docs/privacy.md).
                    "pseudonymization": {"secret": secrets.token_urlsafe(36)}
                    | dict(self.pseudonymization.get(organization) or {}),
                },
                environ={},
            )
            bridge = Bridge(
                settings,
                list(self.plugins),
                services=self.services.get(organization),
                runtime_settings=self.runtime_settings,
            )
            await self._stack.enter_async_context(bridge)
            self._runners.append(asyncio.create_task(bridge.run(self._stop)))
            self.running[organization] = bridge
            self.db_urls[organization] = url
        for bridge in self.running.values():
            await asyncio.wait_for(bridge.subscriptions[0].bound.wait(), 15)

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner, 15)
        await self._stack.aclose()

    def client(self, organization: str) -> FhirClient:
        return site_client(self.sites[organization])

    @contextlib.asynccontextmanager
    async def server_away(self, organization: str) -> AsyncIterator[None]:
        """The organization's FHIR server is stopped (REST and websocket) while in the block,
        then served again on the same port from the same store, as after a restart."""
        server = self.servers[organization]
        await server.stop()
        try:
            yield
        finally:
            site = self.sites[organization]
            self.servers[organization] = await self._stack.enter_async_context(
                SandboxServer(
                    server.service,
                    certificate=site.server_certificate,
                    key=site.server_key,
                    ca_files=[site.ca],
                    port=server.port,
                )
            )

    def tasks(self, organization: str) -> list[dict[str, Any]]:
        """Every Task on a site's FHIR server but published drafts."""
        store = self.servers[organization].service.store
        return [copy.deepcopy(t) for t in store.all("Task") if t.get("status") != "draft"]

    def resources(self, organization: str, resource_type: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(r) for r in self.servers[organization].service.store.all(resource_type)
        ]

    async def request(self, organization: str, **inputs: Any) -> str:
        """Create a start Task at ``organization``; return its id."""
        async with self.client(organization) as client:
            created = await client.create(start_task(organization, **inputs))
        if created.id is None:
            raise BridgeError("the sandbox FHIR server created the start Task without an id")
        return created.id

    async def finished(
        self, organization: str, task_ids: Sequence[str], seconds: float
    ) -> dict[str, dict[str, Any]]:
        """The Tasks once each is ``completed`` or ``failed``; after ``seconds`` a TimeoutError
        naming those still open and their status."""
        status: dict[str, str] = {}

        def note(task_id: str, value: str) -> None:
            status[task_id] = value

        try:
            return await asyncio.wait_for(self._poll(organization, task_ids, note), seconds)
        except TimeoutError:
            open_tasks = {i: s for i, s in status.items() if s not in ("completed", "failed")}
            raise TimeoutError(f"Tasks at {organization} still open: {open_tasks}") from None

    async def _poll(
        self, organization: str, task_ids: Sequence[str], progress: Any
    ) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        seen: dict[str, str] = {}
        async with self.client(organization) as client:
            while len(done) < len(task_ids):
                for task_id in task_ids:
                    if task_id in done:
                        continue
                    task = await client.read("Task", task_id)
                    if seen.get(task_id) != task["status"]:
                        seen[task_id] = task["status"]
                        progress(task_id, task["status"])
                    if task["status"] in ("completed", "failed"):
                        done[task_id] = task
                await asyncio.sleep(0.1)
        return done

    async def settled(self, seconds: float = 15) -> None:
        """Until no Task at a site with a bridge is ``requested`` or ``in-progress``."""

        async def poll() -> None:
            while any(  # noqa: ASYNC110 - the sandbox has no event for status changes
                t["status"] in ("requested", "in-progress")
                for organization in self.running
                for t in self.tasks(organization)
            ):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), seconds)


def waiting_state(db_url: str) -> dict[str, int]:
    """What a bridge's store still waits for: running instances, timers, subscriptions."""
    engine = create_sync_engine(db_url, read_only=True)
    try:
        with engine.connect() as connection:
            running = connection.execute(
                text("SELECT count(*) FROM process_instances WHERE status = 'running'")
            ).scalar_one()
            timers = connection.execute(text("SELECT count(*) FROM timers")).scalar_one()
            subscriptions = connection.execute(
                text("SELECT count(*) FROM message_subscriptions")
            ).scalar_one()
    finally:
        engine.dispose()
    return {"running": int(running), "timers": int(timers), "subscriptions": int(subscriptions)}


async def audit_events(db_url: str) -> int:
    """Verify a bridge's audit chain; return how many events it holds."""
    database = Database(db_url)
    try:
        async with database.transaction() as session:
            report = await verify_chain(session)
    finally:
        await database.dispose()
    if not report.ok:
        raise BridgeError(f"audit chain of {db_url} is broken: {report.problem}")
    if report.unsealed:  # a stopped bridge seals everything before it exits
        raise BridgeError(f"audit chain of {db_url}: {report.unsealed} events not sealed")
    return int(report.events)


# -- CT data ----------------------------------------------------------------------------------


def load_ct_small() -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover - ships in every pydicom wheel
        raise BridgeError("CT_small.dcm is missing from the pydicom installation")
    return pydicom.dcmread(path)


def make_series(template: Dataset, slices: int = 5) -> list[Dataset]:
    """A new pseudonymous study with one axial series of ``slices`` slices 5 mm apart; slice k
    holds the template's pixels shifted by +10k HU so every slice measures differently."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    position = [float(v) for v in template.ImagePositionPatient]
    stored = template.pixel_array.astype(np.int32)
    datasets = []
    for index in range(slices):
        ds = copy.deepcopy(template)
        ds.remove_private_tags()
        for keyword in ("OtherPatientIDsSequence", "PatientBirthDate", "PatientAge"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PatientName = "Pseudonym^Series"
        ds.PatientID = "PSN-0001"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 2
        ds.InstanceNumber = index + 1
        z = position[2] - 5.0 * index
        ds.ImagePositionPatient = [position[0], position[1], z]
        ds.SliceLocation = z
        pixels = np.clip(stored + 10 * index, -32768, 32767).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        datasets.append(ds)
    return datasets


# -- the demo ---------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """One request of the demo: which study, how it ended, what was measured."""

    label: str
    study_instance_uid: str
    status: str
    measurements: dict[str, dict[str, Any]]
    error: str | None = None
    # The encrypted study package that crossed to the provider through DSF (None: no transfer).
    transfer_bytes: int | None = None
    transfer_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "study_instance_uid": self.study_instance_uid,
            "status": self.status,
            "measurements": self.measurements,
        }
        if self.transfer_bytes is not None:
            entry["transfer"] = {"bytes": self.transfer_bytes, "seconds": self.transfer_seconds}
        if self.error is not None:
            entry["error"] = self.error
        return entry


def _output(task: Mapping[str, Any], code: str) -> object:
    for output in task.get("output") or []:
        codes = [c.get("code") for c in (output.get("type") or {}).get("coding") or []]
        if code in codes:
            return next((v for k, v in output.items() if k.startswith("value")), None)
    return None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _error_of(task: Mapping[str, Any]) -> str | None:
    for output in task.get("output") or []:
        codes = [c.get("code") for c in (output.get("type") or {}).get("coding") or []]
        if "error" in codes:
            return str(output.get("valueString"))
    return None


async def _demo(
    workdir: Path, limit: float, say: Any, dsf_release: DsfRelease = DSF_2
) -> tuple[list[DemoResult], dict[str, str], dict[str, int]]:
    started = time.monotonic()

    def progress(text: str) -> None:
        say(f"[{time.monotonic() - started:5.1f}s] {text}")

    with contextlib.ExitStack() as processes:
        orthanc = processes.enter_context(OrthancProcess(workdir / "orthanc").start())
        progress(f"Orthanc (DICOMweb) at {orthanc.dicomweb_url}")
        mlserver = processes.enter_context(
            MLServerProcess(workdir / "mlserver", models=(REFERENCE_MODEL, DENSITY_MODEL)).start()
        )
        progress(
            f"MLServer with models {REFERENCE_MODEL.name} and {DENSITY_MODEL.name} (scikit-learn, "
            f"trained at start-up) at {mlserver.base_url}"
        )
        ct_small = load_ct_small()
        series = make_series(ct_small)
        # A slice 150 HU denser than CT_small, in a study of its own: for the density model.
        [dense] = make_series(shifted(150), 1)
        archive = DicomWebArchive(orthanc.dicomweb_url)
        try:
            await archive.store([ct_small, *series, dense])
        finally:
            archive.close()
        progress(f"stored CT_small.dcm, a {len(series)}-slice series and a denser slice in Orthanc")
        requester_omi = {
            "catalogue": [
                {"id": SERVICE_ID, "name": "CT tissue composition", "organization": DEMO_PROVIDER},
                {
                    "id": DENSITY_SERVICE_ID,
                    "name": "CT slice density",
                    "organization": DEMO_PROVIDER,
                    "contract": DENSITY_MODEL.name,
                },
            ]
        }
        provider_omi = {
            "catalogue": [
                {
                    "id": SERVICE_ID,
                    "name": "CT tissue composition",
                    "model_name": REFERENCE_MODEL.name,
                    "model_version": REFERENCE_MODEL.version,
                    "inference_url": mlserver.base_url,
                },
                {
                    "id": DENSITY_SERVICE_ID,
                    "name": "CT slice density",
                    "contract": DENSITY_MODEL.name,
                    "inference_url": mlserver.base_url,
                },
            ]
        }
        async with InferenceNetwork(
            workdir / "sites",
            {DEMO_REQUESTER: requester_omi, DEMO_PROVIDER: provider_omi},
            dsf_release=dsf_release,
            validate=None,  # a fresh clone without the DSF corpus still runs the demo
        ) as network:
            progress(
                f"sites {DEMO_REQUESTER} (requesting) and {DEMO_PROVIDER} (providing) running, "
                f"each with its DSF {dsf_release.software_version} sandbox FHIR server, bridge "
                "and SQLite store"
            )
            studies = [
                ("CT_small.dcm (1 slice)", str(ct_small.StudyInstanceUID), SERVICE_ID),
                (f"series ({len(series)} slices)", str(series[0].StudyInstanceUID), SERVICE_ID),
                ("denser slice, density model", str(dense.StudyInstanceUID), DENSITY_SERVICE_ID),
            ]
            labels: dict[str, tuple[str, str]] = {}
            for label, study, service in studies:
                task_id = await network.request(
                    DEMO_REQUESTER,
                    study_instance_uid=study,
                    dicomweb_endpoint=orthanc.dicomweb_url,
                    service=service,
                )
                labels[task_id] = (label, study)
                progress(f"{DEMO_REQUESTER}: start Task/{task_id} for {label}")

            def show(task_id: str, status: str) -> None:
                progress(f"{DEMO_REQUESTER}: {labels[task_id][0]}: {status}")

            finished = await asyncio.wait_for(
                network._poll(DEMO_REQUESTER, list(labels), show), limit
            )
            await network.settled()
            results = [
                DemoResult(
                    label=labels[task_id][0],
                    study_instance_uid=labels[task_id][1],
                    status=finished[task_id]["status"],
                    measurements=result_summary(finished[task_id]),
                    error=_error_of(finished[task_id]),
                    transfer_bytes=_int_or_none(_output(finished[task_id], STUDY_PACKAGE_BYTES)),
                    transfer_seconds=_float_or_none(
                        _output(finished[task_id], STUDY_PACKAGE_SECONDS)
                    ),
                )
                for task_id in labels  # request order, not the order they finished in
            ]
            events = {
                organization: await audit_events(url)
                for organization, url in network.db_urls.items()
            }
            return results, dict(network.db_urls), events


def audit_summary(
    db_urls: Mapping[str, str], events: Mapping[str, int], *, kept: bool, served: bool
) -> str:
    """What the demo says about the sites' audit trails, and only commands that work after it
    ends: they read the stores, which stay only with ``--keep``."""
    lines = ["Audit trail (hash chain verified):"]
    for organization, url in db_urls.items():
        lines.append(f"  {organization}: {events[organization]} events")
        if kept:
            db_url = shlex.quote(url)
            lines.append(f"    dsf-bridge audit verify --db-url {db_url}")
            lines.append(f"    dsf-bridge instances list --db-url {db_url}")
    if not kept:
        lines.append(
            "  The stores are removed with the demo's temporary files; run it with --keep to "
            "inspect them afterwards (dsf-bridge audit verify, instances list, api serve)"
        )
    if not served:
        lines.append("  Read them in a browser: run the demo with --serve")
    return "\n".join(lines)


def _table(results: Sequence[DemoResult]) -> str:
    lines = []
    for result in results:
        lines.append(f"{result.label}  study {result.study_instance_uid}: {result.status}")
        if result.transfer_bytes is not None:
            lines.append(
                f"  study package: {result.transfer_bytes:,} bytes crossed to the provider "
                f"through DSF in {result.transfer_seconds or 0:.2f} s (pseudonymized, encrypted)"
            )
        if result.error:
            lines.append(f"  error: {result.error}")
        if result.measurements:
            lines.append(f"  {'measurement':<22} {'value':>10}  unit")
            for name, value in result.measurements.items():
                if isinstance(value["value"], str):  # a classification: class, probability
                    number, unit = value["value"], f"p = {value.get('probability')}"
                else:
                    number = "-" if value["value"] is None else f"{value['value']:.2f}"
                    unit = value.get("unit", "")
                lines.append(f"  {name:<22} {number:>10}  {unit}")
        lines.append("")
    return "\n".join(lines)


async def serve_audit(
    db_urls: Mapping[str, str],
    stop: asyncio.Event,
    say: Any,
    *,
    token: str | None = None,
    started: asyncio.Event | None = None,
) -> dict[str, str]:
    """Serve the admin web page of each site's store (read-only) until ``stop`` is set; return
    the URL per organization. ``started`` is set once every page answers."""
    secret = token or secrets.token_urlsafe(18)
    settings = ApiSettings(token=SecretStr(secret))
    urls: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        for organization, url in db_urls.items():
            database = Database(url, read_only=True)
            stack.push_async_callback(database.dispose)
            app = create_app(
                database,
                settings,
                site=organization,
                diagrams=DiagramLibrary([inference_plugin]),
            )
            server = await stack.enter_async_context(ApiServer(app))
            urls[organization] = f"{server.url}/ui/"
            say(f"{organization}: audit web page at {urls[organization]}")
        say(f"log in with any user name and the password {secret}; Ctrl-C stops")
        if started is not None:
            started.set()
        await stop.wait()
    return urls


async def _serve_until_signalled(db_urls: Mapping[str, str], say: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve_audit(db_urls, stop, say)


@contextlib.contextmanager
def demo_workdir(prefix: str, *, keep: bool, say: Callable[[str], None]) -> Iterator[Path]:
    """A temporary directory for a demo's sites and components: removed afterwards, or kept
    (and said so) with ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield workdir
    finally:
        if keep:
            say(f"kept the demo's files in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_demo(
    *,
    as_json: bool = False,
    timeout: float = 120.0,
    keep: bool = False,
    serve: bool = False,
    dsf_release: DsfRelease = DSF_2,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the demo; print the table (or one JSON object) to ``out``, progress to ``err``;
    with ``serve``, then serve both sites' audit web pages until interrupted. Return the exit
    status: 0 when every request completed."""
    stdout = out if out is not None else sys.stdout
    stderr = err if err is not None else sys.stderr

    def say(text: str) -> None:
        print(text, file=stderr, flush=True)

    with demo_workdir("dsf-bridge-demo-", keep=keep, say=say) as workdir:
        try:
            results, db_urls, events = asyncio.run(_demo(workdir, timeout, say, dsf_release))
        except ComponentMissingError as exc:
            say(f"dsf-bridge demo: {exc}")
            return 2
        except TimeoutError:
            say(f"dsf-bridge demo: the requests did not finish within {timeout:.0f} s")
            return 1
        if as_json:
            print(json.dumps({"results": [r.as_json() for r in results]}), file=stdout)
        else:
            print(_table(results), file=stdout)
            print(audit_summary(db_urls, events, kept=keep, served=serve), file=stdout)
        if serve:
            asyncio.run(_serve_until_signalled(db_urls, say))
        return 0 if all(r.status == "completed" for r in results) else 1
