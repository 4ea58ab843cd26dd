"""The admin API: health, readiness, metrics and the audit of every process state.

``/health`` and ``/ready`` are open (orchestrators probe them); everything else needs the token
(:mod:`dsf_bridge.api.security`). The JSON API lives under ``/api/v1``, the web page under
``/ui`` (:mod:`dsf_bridge.api.ui`); both read the store through
:mod:`dsf_bridge.store.queries`. The only writes are the operator's requests (retry an
incident, cancel an instance), with the operator token alone; they are queued through
:mod:`dsf_bridge.runtime.operations` as the CLI's are, and the bridge's job worker applies them
with an audit event naming the operator.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Literal

import structlog
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from dsf_bridge import __version__
from dsf_bridge.api.context import ApiContext
from dsf_bridge.api.diagram import DiagramLibrary
from dsf_bridge.api.fhir import ServerTask, TaskReader
from dsf_bridge.api.metrics import CONTENT_TYPE, render_metrics
from dsf_bridge.api.probes import Clock, Probe, ProbeResult, utcnow
from dsf_bridge.api.security import OperatorGuard, TokenGuard
from dsf_bridge.api.ui import ui_router
from dsf_bridge.config import ApiSettings
from dsf_bridge.errors import StoreError
from dsf_bridge.runtime import operations
from dsf_bridge.store import Database
from dsf_bridge.store import queries as q
from dsf_bridge.store.kinds import TaskSeenStatus

__all__ = ["create_app"]

log = structlog.get_logger("dsf_bridge.api")

MAX_SEQUENCE = 2**63 - 1  # audit ids are BIGINT


def _has_nul(request: Request) -> bool:
    return "\x00" in request.url.path or any(
        "\x00" in key or "\x00" in value for key, value in request.query_params.multi_items()
    )


# -- response models (they document /api/v1/openapi.json) ---------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class ProbeOut(_Model):
    name: str
    kind: str
    ok: bool
    detail: str
    age_seconds: float | None = None
    connected: bool | None = None


class Readiness(_Model):
    status: Literal["ready", "not ready"]
    checks: list[ProbeOut]


class Health(_Model):
    status: Literal["ok"]
    version: str
    site: str | None


class InstancePage(_Model):
    instances: list[q.InstanceRow]
    next_before: str | None


class TaskPage(_Model):
    tasks: list[q.TaskRow]
    next_before: str | None


class ServerTaskOut(_Model):
    """The Task as read from the FHIR server now, or why it could not be read."""

    status: str | None = None
    requester: str | None = None
    message_name: str | None = None
    failure: str | None = None
    unavailable: str | None = None


class TaskOut(_Model):
    task_id: str
    versions: list[q.TaskRow]
    facts: list[q.TaskFacts]
    instances: list[str]
    audit: list[q.AuditRow]
    server: ServerTaskOut


class DefinitionOut(_Model):
    process_key: str
    version: str
    plugin: str
    status: str
    deployed_at: dt.datetime
    instances: dict[str, int]
    total: int


class AuditPage(_Model):
    events: list[q.AuditRow]
    next_before: int | None


class ChainOut(_Model):
    ok: bool
    events: int
    first_bad_sequence: int | None
    problem: str | None
    unsealed: int
    records: int
    unrecorded: int
    record_problems: list[str]


# -- the app -------------------------------------------------------------------------------


def _security_headers(response: Response) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    )


def create_app(
    database: Database,
    settings: ApiSettings,
    *,
    probes: Sequence[Probe] = (),
    clock: Clock = utcnow,
    site: str | None = None,
    operator_database: Database | None = None,
    diagrams: DiagramLibrary | None = None,
    task_reader: TaskReader | None = None,
) -> FastAPI:
    """The admin app over ``database``; ``probes`` add to the database probe for ``/ready``.
    ``operator_database`` is a writable connection for the operator's requests (given only
    with ``settings.operator_token``); ``database`` may be read-only. ``diagrams`` holds the
    deployed models the instance page draws; ``task_reader`` reads Tasks from the local FHIR
    server (without it, pages show the store's last word on a Task, labelled as such)."""
    context = ApiContext(
        database,
        probes,
        clock=clock,
        site=site,
        operator_database=operator_database,
        diagrams=diagrams,
        task_reader=task_reader,
    )
    app = FastAPI(
        title="dsf-bridge admin API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served under /api/v1 behind the token
        # Bodies only as application/json: a form, text/plain or typeless body (what a
        # cross-site page can send without a CORS preflight, with the Basic credentials the
        # browser remembers) is a 422 before any operator action runs.
        strict_content_type=True,
    )
    app.state.context = context
    guard = Depends(TokenGuard(settings.token, settings.operator_token))
    # Without a writable connection no bridge runs the requests here (dsf-bridge api serve):
    # the operator's actions are closed (403), and the page shows no forms for them.
    operator_guard = OperatorGuard(
        settings.operator_token,
        closed=None
        if operator_database is not None or settings.operator_token is None
        else "operator actions are closed: this API serves a store without a bridge to run "
        "them (dsf-bridge api serve); use the API of 'dsf-bridge run' or the CLI",
    )

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        if _has_nul(request):  # PostgreSQL refuses NUL in text; so do we, before any query
            response: Response = JSONResponse(
                {"detail": "the request contains a NUL character"}, status_code=400
            )
        else:
            response = await call_next(request)
        _security_headers(response)
        return response

    @app.exception_handler(StoreError)
    async def store_down(_request: Request, exc: StoreError) -> Response:
        log.warning("api.store_unavailable", error=str(exc))
        response = JSONResponse({"detail": f"the store does not answer: {exc}"}, status_code=503)
        _security_headers(response)
        return response

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> Response:
        log.error("api.failed", error=repr(exc))
        response = JSONResponse({"detail": "internal error; see the bridge's log"}, 500)
        _security_headers(response)
        return response

    @app.get("/health", response_model=Health, tags=["probes"])
    async def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok", version=__version__, site=context.site)

    @app.get("/ready", response_model=Readiness, tags=["probes"])
    async def ready() -> JSONResponse:
        """Readiness: 200 when the store answers and every subscription and worker is alive."""
        results = await context.run_probes()
        body = Readiness(
            status="ready" if all(r.ok for _, r in results) else "not ready",
            checks=[ProbeOut(name=p.name, kind=p.kind, **_result_fields(r)) for p, r in results],
        )
        return JSONResponse(
            body.model_dump(mode="json"), status_code=200 if body.status == "ready" else 503
        )

    @app.get("/metrics", dependencies=[guard], tags=["probes"])
    async def metrics() -> Response:
        """Prometheus text format."""
        now = context.clock()
        results = await context.run_probes()
        # The probe metrics still say that the store is down: the counts are not read from a
        # store whose probe failed, and not waited for longer than a probe (a store that
        # hangs would hold the scrape past Prometheus's scrape timeout, losing every metric).
        counts: q.StoreCounts | None = None
        if all(result.ok for probe, result in results if probe.kind == "database"):
            counts = await context.read_within(lambda s: q.count_store(s, now))
            if counts is None:
                log.warning(
                    "api.metrics_without_store_counts", reason="the store failed or was slow"
                )
        body = render_metrics(counts, results, version=__version__, now=now)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    api = APIRouter(prefix="/api/v1", dependencies=[guard], tags=["audit"])

    @api.get("/instances", response_model=InstancePage)
    async def instances(
        status: str | None = None,
        process: str | None = None,
        business_key: str | None = None,
        before: str | None = Query(None, description="next_before of the previous page"),
        limit: int = Query(50, ge=1, le=q.MAX_PAGE),
    ) -> InstancePage:
        """Process instances, newest first."""
        rows = await context.read(
            lambda s: q.list_instances(
                s,
                status=status,
                process_key=process,
                business_key=business_key,
                before=before,
                limit=limit + 1,
            )
        )
        return InstancePage(
            instances=rows[:limit],
            next_before=rows[limit - 1].id if len(rows) > limit else None,
        )

    @api.get("/instances/{instance_id}", response_model=q.InstanceDetail)
    async def instance(instance_id: str) -> q.InstanceDetail:
        """One instance: its state, Tasks, waits, timers, jobs, effects and audit events."""
        detail = await context.read(lambda s: q.instance_detail(s, instance_id))
        if detail is None:
            raise HTTPException(404, f"no process instance {instance_id}")
        return detail

    @api.get("/tasks", response_model=TaskPage)
    async def tasks(
        role: Literal["incoming", "outgoing"] | None = None,
        status: TaskSeenStatus | None = None,
        instance: str | None = Query(None, description="only the Tasks of this instance"),
        before: str | None = Query(None, description="next_before of the previous page"),
        limit: int = Query(50, ge=1, le=q.MAX_PAGE),
    ) -> TaskPage:
        """Task versions taken in or sent, newest first (failed intakes have no instance)."""
        rows = await context.read(
            lambda s: q.list_tasks(
                s, role=role, status=status, instance_id=instance, before=before, limit=limit + 1
            )
        )
        return TaskPage(
            tasks=rows[:limit],
            next_before=q.task_cursor(rows[limit - 1]) if len(rows) > limit else None,
        )

    @api.get("/tasks/{task_id}", response_model=TaskOut)
    async def task(task_id: str) -> TaskOut:
        """One Task: its versions, what the store knows of it, the FHIR server's status."""
        detail = await context.read(lambda s: q.task_detail(s, task_id))
        if detail is None:
            raise HTTPException(404, f"no Task {task_id} taken in or sent")
        server = await context.server_tasks(detail.versions)
        return TaskOut(
            task_id=detail.task_id,
            versions=list(detail.versions),
            facts=list(detail.facts),
            instances=list(detail.instances),
            audit=list(detail.audit),
            server=_server_out(server.get(task_id)),
        )

    @api.get("/definitions", response_model=list[DefinitionOut])
    async def definitions() -> list[DefinitionOut]:
        """Deployed process versions with their instance counts per status."""
        rows = await context.read(q.list_definitions)
        return [
            DefinitionOut(
                process_key=r.process_key,
                version=r.version,
                plugin=r.plugin,
                status=r.status,
                deployed_at=r.deployed_at,
                instances=dict(r.instances),
                total=r.total,
            )
            for r in rows
        ]

    @api.get("/audit", response_model=AuditPage)
    async def audit(
        subject: str | None = Query(None, description="e.g. instance/<id> or Task/<id>"),
        action: str | None = None,
        before: int | None = Query(
            None, ge=1, le=MAX_SEQUENCE, description="next_before of the previous page"
        ),
        limit: int = Query(100, ge=1, le=q.MAX_PAGE),
    ) -> AuditPage:
        """Audit events, newest first."""
        rows = await context.read(
            lambda s: q.list_audit_events(
                s, subject=subject, action=action, before=before, limit=limit + 1
            )
        )
        return AuditPage(
            events=rows[:limit],
            next_before=rows[limit - 1].id if len(rows) > limit else None,
        )

    @api.get("/audit/verify", response_model=ChainOut)
    async def audit_verify() -> ChainOut:
        """Walk the whole hash chain (as ``dsf-bridge audit verify``)."""
        report = await context.verify_chain()
        return ChainOut.model_validate(report)

    @api.get("/incidents", response_model=list[operations.IncidentListing])
    async def incidents() -> list[operations.IncidentListing]:
        """Every incident (a job out of retries) of every running instance."""
        return await context.read(operations.list_incidents)

    async def _queue(work: Any, instance_id: str, action: str, actor: str) -> QueuedOut:
        job = await context.queue(work, instance_id, action, actor)
        return QueuedOut(job=job, instance_id=instance_id, action=action, actor=actor)

    @api.post(
        "/instances/{instance_id}/incidents/{token}/retry",
        status_code=202,
        response_model=QueuedOut,
        tags=["operations"],
    )
    async def retry_incident(
        instance_id: str,
        token: str,
        body: RetryIn,
        actor: str = Depends(operator_guard),
    ) -> QueuedOut:
        """Give the incident at ``token`` new tries (operator token only)."""
        return await _queue(
            lambda s: operations.request_retry(
                s, instance_id, token, retries=body.retries, actor=actor, now=context.clock()
            ),
            instance_id,
            "retry",
            actor,
        )

    @api.post(
        "/instances/{instance_id}/cancel",
        status_code=202,
        response_model=QueuedOut,
        tags=["operations"],
    )
    async def cancel_instance(
        instance_id: str,
        body: CancelIn,
        actor: str = Depends(operator_guard),
    ) -> QueuedOut:
        """Cancel a running instance; its Tasks fail with ``reason`` (operator token only)."""
        return await _queue(
            lambda s: operations.request_cancel(
                s, instance_id, reason=body.reason, actor=actor, now=context.clock()
            ),
            instance_id,
            "cancel",
            actor,
        )

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api)
    app.include_router(
        ui_router(context, TokenGuard(settings.token, settings.operator_token), operator_guard)
    )
    return app


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retries: int = Field(1, ge=1, le=operations.MAX_RETRIES)


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reason: str = Field(min_length=1, max_length=operations.MAX_REASON)


class QueuedOut(BaseModel):
    """An operator request queued for the bridge's job worker."""

    job: int
    instance_id: str
    action: str
    actor: str


def _server_out(found: ServerTask | str | None) -> ServerTaskOut:
    if isinstance(found, ServerTask):
        return ServerTaskOut(
            status=found.status,
            requester=found.requester,
            message_name=found.message_name,
            failure=found.failure,
        )
    if found is None:
        return ServerTaskOut(
            unavailable="only Tasks taken in are read: a Task sent lives on its recipient's server"
        )
    return ServerTaskOut(
        unavailable=found
        or "the API has no access to the FHIR server (dsf-bridge api serve, the demo)"
    )


def _result_fields(result: ProbeResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "detail": result.detail,
        "age_seconds": result.age_seconds,
        "connected": result.connected,
    }
