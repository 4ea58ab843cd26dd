"""``dsf-bridge demo --consortium``: one coordinator and three data sites on one machine
(``docs/consortium.md``, "The demo").

Each data site runs its own bridge, its own sandbox DSF FHIR server and its own Orthanc with
synthetic CT studies (``CT_small.dcm`` shifted in Hounsfield units, one slice per study, each
study its own patient); MLServer serves the reference model to all of them. ``Hospital_A`` holds
enough studies to report; ``Hospital_B`` fewer than k (its cells come back suppressed);
``Hospital_C`` asks a person to approve every consortium request and nobody does, so the
coordinator records it ``timed-out``. The coordinator merges what came back and prints, with
``--json``, one object with ``sites`` and ``pooled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from pydicom.dataset import Dataset
from sqlalchemy import text

from dsf_bridge.dsf.tasks import build_task
from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM
from dsf_bridge.engine import state as engine_state
from dsf_bridge.errors import BridgeError
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.plugins.consortium import (
    CODESYSTEM_CONSORTIUM,
    CONSORTIUM_RESULT,
    DCM,
    consortium_result,
    site_states,
)
from dsf_bridge.plugins.consortium import plugin as consortium_plugin
from dsf_bridge.sandbox.components import (
    REFERENCE_MODEL,
    ComponentMissingError,
    MLServerProcess,
    OrthancProcess,
)
from dsf_bridge.sandbox.demo import InferenceNetwork, demo_workdir, make_series
from dsf_bridge.sandbox.refmodel.density import shifted
from dsf_bridge.store import create_sync_engine

__all__ = [
    "START_CANONICAL",
    "START_PROFILE",
    "consortium_start_task",
    "instance_variables",
    "run_consortium_demo",
    "synthetic_studies",
]

START_PROFILE = "http://dsf-bridge.dev/fhir/StructureDefinition/task-start-consortium-inference|1.0"
START_CANONICAL = "http://dsf-bridge.dev/bpe/Process/consortiumInference|1.0"

COORDINATOR = "Coordinator"
# (organization, studies, approval): B holds fewer than k = 5, C waits for an approval.
DATA_SITES: tuple[tuple[str, int, bool], ...] = (
    ("Hospital_A", 10, False),
    ("Hospital_B", 3, False),
    ("Hospital_C", 6, True),
)
SERVICE_ID = "tissue-composition"
SITE_TIMEOUT = "PT10S"


def consortium_start_task(
    organization: str,
    *,
    service: str,
    modalities: Sequence[str] = ("CT",),
    targets: Sequence[str] = (),
    parent: str | None = None,
    role: tuple[str, str] | None = None,
    body_part: str | None = None,
    study_date_from: str | None = None,
    study_date_to: str | None = None,
    series_description: str | None = None,
    minimum_k: int | None = None,
    site_timeout: str | None = None,
    extra_inputs: Sequence[Mapping[str, object]] = (),
) -> dict[str, Any]:
    """A ``startConsortiumInference`` Task as a researcher or the FHIR UI would create it."""
    inputs: list[dict[str, object]] = []

    def add(code: str, value: object) -> None:
        inputs.append({"system": CODESYSTEM_CONSORTIUM, "code": code, "value": value})

    def identifier(name: str) -> dict[str, object]:
        return {"valueIdentifier": {"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": name}}

    add("service", service)
    for modality in modalities:
        add("cohort-modality", {"system": DCM, "code": modality})
    for code, value in (
        ("cohort-body-part", body_part),
        ("cohort-series-description", series_description),
        ("site-timeout", site_timeout),
    ):
        if value is not None:
            add(code, value)
    for code, day in (
        ("cohort-study-date-from", study_date_from),
        ("cohort-study-date-to", study_date_to),
    ):
        if day is not None:
            add(code, {"valueDate": day})
    for target in targets:
        add("target-organization", identifier(target))
    if parent is not None:
        add("target-parent-organization", identifier(parent))
    if role is not None:
        add("target-role", {"system": role[0], "code": role[1]})
    if minimum_k is not None:
        add("minimum-k", {"valuePositiveInt": minimum_k})
    inputs.extend(dict(item) for item in extra_inputs)
    return build_task(
        instantiates_canonical=START_CANONICAL,
        message_name="startConsortiumInference",
        profile=START_PROFILE,
        business_key=None,
        correlation_key=None,
        requester=organization,
        recipient=organization,
        inputs=inputs,
        authored_on=dt.datetime.now(dt.UTC),
    )


def synthetic_studies(count: int, *, offset_hu: float = 0.0, step_hu: float = 7.0) -> list[Dataset]:
    """``count`` one-slice CT studies, each a new patient and study, ``CT_small.dcm`` shifted
    by ``offset_hu + i * step_hu`` Hounsfield units: every study measures differently."""
    studies = []
    for index in range(count):
        [slice_] = make_series(shifted(offset_hu + index * step_hu), 1)
        slice_.PatientID = f"PSN-{offset_hu:+.0f}-{index:03d}"
        slice_.PatientName = f"Synthetic^{index:03d}"
        studies.append(slice_)
    return studies


def instance_variables(db_url: str, process: str) -> list[dict[str, Any]]:
    """The process variables of every instance of ``process`` in a bridge's store, oldest
    first."""
    engine = create_sync_engine(db_url, read_only=True)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT state FROM process_instances ORDER BY created_at")
            ).all()
    finally:
        engine.dispose()
    found = []
    for (raw,) in rows:
        state = engine_state.loads(raw) if isinstance(raw, str | bytes) else raw
        if engine_state.process_key(state) == process:
            found.append(dict(engine_state.process_variables(state)))
    return found


async def _consortium_demo(
    workdir: Path, limit: float, say: Any, dsf_release: DsfRelease
) -> dict[str, Any]:
    started = time.monotonic()

    def progress(text: str) -> None:
        say(f"[{time.monotonic() - started:5.1f}s] {text}")

    with contextlib.ExitStack() as processes:
        mlserver = processes.enter_context(
            MLServerProcess(workdir / "mlserver", models=(REFERENCE_MODEL,)).start()
        )
        progress(f"MLServer with model {REFERENCE_MODEL.name} at {mlserver.base_url}")
        bridges: dict[str, dict[str, Any]] = {
            COORDINATOR: {"consortium": {"site_timeout": SITE_TIMEOUT}}
        }
        for index, (organization, count, approval) in enumerate(DATA_SITES):
            orthanc = processes.enter_context(
                OrthancProcess(workdir / f"orthanc-{organization}").start()
            )
            archive = DicomWebArchive(orthanc.dicomweb_url)
            try:
                await archive.store(synthetic_studies(count, offset_hu=-40.0 + 25.0 * index))
            finally:
                archive.close()
            progress(f"{organization}: Orthanc at {orthanc.dicomweb_url} with {count} CT studies")
            bridges[organization] = {
                "catalogue": [
                    {
                        "id": SERVICE_ID,
                        "model_name": REFERENCE_MODEL.name,
                        "inference_url": mlserver.base_url,
                    }
                ],
                "consortium": {"dicomweb_url": orthanc.dicomweb_url, "approval": approval},
            }
        async with InferenceNetwork(
            workdir / "sites",
            bridges,
            dsf_release=dsf_release,
            validate=None,
            plugins=(consortium_plugin,),
        ) as network:
            progress(
                f"coordinator {COORDINATOR} and data sites "
                f"{', '.join(name for name, _, _ in DATA_SITES)} running, each with its DSF "
                f"{dsf_release.software_version} sandbox FHIR server, bridge and SQLite store "
                "(Hospital_B holds fewer than k = 5 studies; Hospital_C waits for an approval "
                f"nobody gives, the coordinator waits {SITE_TIMEOUT} per site)"
            )
            async with network.client(COORDINATOR) as client:
                created = await client.create(
                    consortium_start_task(
                        COORDINATOR,
                        service=SERVICE_ID,
                        targets=[name for name, _, _ in DATA_SITES],
                    )
                )
            if created.id is None:
                raise BridgeError("the sandbox FHIR server created the start Task without an id")
            progress(f"{COORDINATOR}: start Task/{created.id}")

            def show(task_id: str, status: str) -> None:
                progress(f"{COORDINATOR}: consortium request: {status}")

            finished = await asyncio.wait_for(network._poll(COORDINATOR, [created.id], show), limit)
            start = finished[created.id]
            [variables] = instance_variables(
                network.db_urls[COORDINATOR], "dsf-bridgedev_consortiumInference"
            )
            merged = consortium_result(variables) or {"sites": [], "pooled": {}, "unpooled": {}}
            merged = {
                "status": start["status"],
                "result": _output_reference(start),
                **merged,
                "states": site_states(variables),
            }
            return merged


def _output_reference(task: Mapping[str, Any]) -> str | None:
    for output in task.get("output") or []:
        codes = [c.get("code") for c in (output.get("type") or {}).get("coding") or []]
        if CONSORTIUM_RESULT in codes:
            return str((output.get("valueReference") or {}).get("reference"))
    return None


def _table(merged: Mapping[str, Any]) -> str:
    lines = ["site          status      reason / figures"]
    for site in merged.get("sites") or []:
        shown = []
        for aggregate in site.get("aggregates") or []:
            if aggregate.get("suppressed"):
                shown.append(f"{aggregate['measurement']} suppressed")
            elif aggregate.get("kind") == "numeric":
                shown.append(
                    f"{aggregate['measurement']} n={aggregate['n']} mean={aggregate['mean']:.2f}"
                )
        detail = site.get("reason") or "; ".join(shown[:3]) + (" ..." if len(shown) > 3 else "")
        lines.append(f"{site['organization']:<13} {site['status']:<11} {detail}")
    lines.append("")
    lines.append("pooled        n     mean        sd")
    for name, pooled in sorted((merged.get("pooled") or {}).items()):
        if pooled.get("kind") == "numeric":
            lines.append(f"{name:<13} {pooled['n']:<5} {pooled['mean']:<11.3f} {pooled['sd']:.3f}")
    return "\n".join(lines)


def run_consortium_demo(
    *,
    as_json: bool = False,
    timeout: float = 120.0,
    keep: bool = False,
    dsf_release: DsfRelease = DSF_2,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the consortium demo; print the merged result (a table, or one JSON object with
    ``sites`` and ``pooled``) to ``out``, progress to ``err``. Exit status 0 when the start Task
    completed (with a partial result: one site is below k, one times out on purpose)."""
    stdout = out if out is not None else sys.stdout
    stderr = err if err is not None else sys.stderr

    def say(text: str) -> None:
        print(text, file=stderr, flush=True)

    with demo_workdir("dsf-bridge-consortium-", keep=keep, say=say) as workdir:
        try:
            merged = asyncio.run(_consortium_demo(workdir, timeout, say, dsf_release))
        except ComponentMissingError as exc:
            say(f"dsf-bridge demo: {exc}")
            return 2
        except TimeoutError:
            say(f"dsf-bridge demo: the consortium request did not finish within {timeout:.0f} s")
            return 1
        if as_json:
            print(json.dumps(merged), file=stdout)
        else:
            print(_table(merged), file=stdout)
        return 0 if merged["status"] == "completed" else 1
