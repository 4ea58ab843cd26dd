"""The web page: instances, where each one stands (drawn on the process diagram) and how it got
there, Tasks with their status on the FHIR server, process versions, incidents and the audit
chain.

Server-rendered HTML (Jinja2 with autoescaping) and inline SVG, no JavaScript and no external
assets, so it works under the strict Content-Security-Policy the app sends and on an air-gapped
site. Everything behind the token guard; the browser asks for it with a Basic prompt. Signed in
with the operator token, the incident and instance pages offer retry and cancel as forms that
carry a MAC under that token (:meth:`~dsf_bridge.api.security.OperatorGuard.form_token`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from dsf_bridge import __version__
from dsf_bridge.api.context import ApiContext
from dsf_bridge.api.diagram import instance_marks, render_svg
from dsf_bridge.api.security import OperatorGuard, TokenGuard
from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.state import InstanceStatus, Phase, Wait, WaitKind
from dsf_bridge.runtime import operations
from dsf_bridge.store import queries as q

__all__ = ["describe_state", "ui_router"]

_HERE = Path(__file__).parent
_PHASES = {
    Phase.MOVING: "moving on",
    Phase.ASYNC_BEFORE: "async job before the element",
    Phase.ASYNC_AFTER: "async job after the element",
    Phase.START_LISTENER: "start listener",
    Phase.END_LISTENER: "end listener",
    Phase.TASK_LISTENER: "task listener",
    Phase.HANDLER: "handler running",
    Phase.USER_TASK: "user task (QuestionnaireResponse)",
    Phase.JOIN: "at a parallel join, waiting for the other branches",
    Phase.WAITING: "waiting",
    Phase.SUBPROCESS: "inside an embedded subprocess",
    Phase.MULTI_INSTANCE: "multi-instance running",
}
_WAIT_KINDS = {
    WaitKind.MESSAGE: "message",
    WaitKind.TIMER: "timer",
    WaitKind.SIGNAL: "signal",
    WaitKind.CONDITION: "condition",
}
INSTANCE_STATUSES = tuple(status.label for status in InstanceStatus)
_STATIC = {"style.css": "text/css", "favicon.svg": "image/svg+xml"}
_MAX_FORM = 8192


def describe_state(state: Mapping[str, Any]) -> list[dict[str, str]]:
    """Where an instance's tokens stand, in words: one row per token, oldest first."""
    rows = []
    for token in instance_state.tokens(state):
        incident = token.incident
        rows.append(
            {
                "token": token.id,
                "element": token.element,
                "phase": _PHASES[token.phase],
                "waiting_for": "; ".join(_describe_wait(wait) for wait in token.waits),
                "incident": f"incident: {incident.message}" if incident is not None else "",
            }
        )
    return rows


def _describe_wait(wait: Wait) -> str:
    what = f"{_WAIT_KINDS[wait.kind]} {wait.key}" if wait.key else _WAIT_KINDS[wait.kind]
    where = f"boundary event {wait.element}" if wait.boundary else wait.element
    return f"{what} at {where}"


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["pretty"] = lambda value: json.dumps(value, indent=2, sort_keys=True, default=str)
    env.globals["version"] = __version__
    return env


async def _form(request: Request) -> dict[str, str]:
    """A posted HTML form (``application/x-www-form-urlencoded``, at most 8 KiB)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "post the page's form (application/x-www-form-urlencoded)")
    body = await request.body()
    if len(body) > _MAX_FORM:
        raise HTTPException(413, "form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[-1] for name, values in fields.items()}


def ui_router(
    context: ApiContext, guard: TokenGuard, operator: OperatorGuard | None = None
) -> APIRouter:
    """The ``/ui`` pages over the app's :class:`~dsf_bridge.api.app.ApiContext`; with
    ``operator``, the forms for retry and cancel (shown to the operator token alone)."""
    env = _environment()
    operator = operator or OperatorGuard(None)
    router = APIRouter(prefix="/ui", dependencies=[Depends(guard)], include_in_schema=False)

    def page(request: Request, template: str, **values: Any) -> HTMLResponse:
        html = env.get_template(template).render(
            site=context.site,
            path=request.url.path,
            operator=operator.admits(request),
            form_token=operator.form_token,
            incident_moment=operations.incident_moment,
            **values,
        )
        return HTMLResponse(html)

    @router.get("/")
    async def instances(
        request: Request,
        *,
        status: str | None = None,
        process: str | None = None,
        business_key: str | None = None,
        before: str | None = None,
        limit: int = Query(50, ge=1, le=q.MAX_PAGE),
    ) -> HTMLResponse:
        filters = {
            "status": status or None,
            "process_key": process or None,
            "business_key": business_key or None,
        }
        rows = await context.read(
            lambda s: q.list_instances(s, before=before or None, limit=limit + 1, **filters)
        )
        now = context.clock()
        counts = await context.read(lambda s: q.count_store(s, now))
        by_status: dict[str, int] = {}
        for (_process, state), count in counts.instances.items():
            by_status[state] = by_status.get(state, 0) + count
        probes = await context.run_probes()
        facts = await context.read(lambda s: q.instance_facts(s, [r.id for r in rows[:limit]]))
        return page(
            request,
            "instances.html",
            rows=rows[:limit],
            facts=facts,
            statuses=INSTANCE_STATUSES,
            filters={"status": status or "", "process": process or "", "bk": business_key or ""},
            next_before=rows[limit - 1].id if len(rows) > limit else None,
            by_status=by_status,
            probes=probes,
            ready=all(result.ok for _, result in probes),
        )

    @router.get("/instances/{instance_id}")
    async def instance(request: Request, instance_id: str) -> HTMLResponse:
        detail = await context.read(lambda s: q.instance_detail(s, instance_id))
        if detail is None:
            raise HTTPException(404, f"no process instance {instance_id}")
        diagram, note = context.diagrams.diagram(
            detail.instance.process_key, detail.instance.process_version
        )
        svg = None
        if diagram is not None:
            found = instance_marks(
                diagram, detail.state, [(e.action, e.reason) for e in detail.audit]
            )
            svg = Markup(render_svg(diagram, found))  # noqa: S704 - lxml escaped its text
        facts = await context.read(lambda s: q.task_facts(s, detail.tasks))
        return page(
            request,
            "instance.html",
            d=detail,
            tokens=describe_state(detail.state),
            variables=sorted(instance_state.process_variables(detail.state).items()),
            progress=context.diagrams.progress(
                detail.instance.process_key, instance_state.process_variables(detail.state)
            ),
            diagram=svg,
            diagram_note=note,
            facts=facts,
            server=await context.server_tasks(detail.tasks),
        )

    @router.get("/tasks")
    async def tasks(
        request: Request,
        *,
        role: str | None = None,
        status: str | None = None,
        instance: str | None = None,
        before: str | None = None,
        limit: int = Query(50, ge=1, le=q.MAX_PAGE),
    ) -> HTMLResponse:
        rows = await context.read(
            lambda s: q.list_tasks(
                s,
                role=role or None,
                status=status or None,
                instance_id=instance or None,
                before=before or None,
                limit=limit + 1,
            )
        )
        shown = rows[:limit]
        facts = await context.read(lambda s: q.task_facts(s, shown))
        return page(
            request,
            "tasks.html",
            rows=shown,
            facts=facts,
            server=await context.server_tasks(shown),
            filters={"role": role or "", "status": status or "", "instance": instance or ""},
            next_before=q.task_cursor(rows[limit - 1]) if len(rows) > limit else None,
            limit=limit,
        )

    @router.get("/tasks/{task_id}")
    async def task(request: Request, task_id: str) -> HTMLResponse:
        detail = await context.read(lambda s: q.task_detail(s, task_id))
        if detail is None:
            raise HTTPException(404, f"no Task {task_id} taken in or sent")
        return page(
            request,
            "task.html",
            t=detail,
            facts={(f.task_id, f.role): f for f in detail.facts},
            server=await context.server_tasks(detail.versions),
        )

    @router.get("/processes")
    async def processes(request: Request) -> HTMLResponse:
        rows = await context.read(q.list_definitions)
        return page(request, "processes.html", rows=rows, statuses=INSTANCE_STATUSES)

    @router.get("/incidents")
    async def incidents(request: Request) -> HTMLResponse:
        rows = await context.read(operations.list_incidents)
        return page(request, "incidents.html", rows=rows)

    @router.post("/instances/{instance_id}/incidents/{token}/retry")
    async def retry(request: Request, instance_id: str, token: str) -> HTMLResponse:
        actor = operator(request)
        form = await _form(request)
        # The form names the incident's moment: an old form (or a page reloaded later) cannot
        # retry another incident that came back at the same token.
        seen_at = form.get("at", "")
        if not operator.check_form_token(
            form.get("form", ""), "retry", instance_id, token, seen_at
        ):
            raise HTTPException(403, "the form is not this page's: open the page and retry")
        try:
            retries = int(form.get("retries", "1"))
        except ValueError:
            retries = 0
        if not 1 <= retries <= operations.MAX_RETRIES:
            raise HTTPException(422, f"retries must be 1 to {operations.MAX_RETRIES}")
        job = await context.queue(
            lambda s: operations.request_retry(
                s,
                instance_id,
                token,
                retries=retries,
                actor=actor,
                now=context.clock(),
                seen_at=seen_at,
            ),
            instance_id,
            "retry",
            actor,
        )
        return page(
            request, "queued.html", action="retry", instance_id=instance_id, job=job, actor=actor
        )

    @router.post("/instances/{instance_id}/cancel")
    async def cancel(request: Request, instance_id: str) -> HTMLResponse:
        actor = operator(request)
        form = await _form(request)
        if not operator.check_form_token(form.get("form", ""), "cancel", instance_id):
            raise HTTPException(403, "the form is not this page's: open the page and retry")
        reason = form.get("reason", "").strip()
        if not reason or len(reason) > operations.MAX_REASON:
            raise HTTPException(
                422, f"give a reason (1 to {operations.MAX_REASON} characters) to cancel"
            )
        job = await context.queue(
            lambda s: operations.request_cancel(
                s, instance_id, reason=reason, actor=actor, now=context.clock()
            ),
            instance_id,
            "cancel",
            actor,
        )
        return page(
            request, "queued.html", action="cancel", instance_id=instance_id, job=job, actor=actor
        )

    @router.get("/audit")
    async def audit(
        request: Request,
        subject: str | None = None,
        before: int | None = Query(None, ge=1, le=2**63 - 1),
        verify: bool = False,
        limit: int = Query(100, ge=1, le=q.MAX_PAGE),
    ) -> HTMLResponse:
        rows = await context.read(
            lambda s: q.list_audit_events(
                s, subject=subject or None, before=before, limit=limit + 1
            )
        )
        chain = await context.verify_chain() if verify else None
        return page(
            request,
            "audit.html",
            rows=rows[:limit],
            subject=subject or "",
            next_before=rows[limit - 1].id if len(rows) > limit else None,
            chain=chain,
        )

    @router.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        media_type = _STATIC.get(name)
        if media_type is None:
            raise HTTPException(404, f"no static file {name}")
        return FileResponse(_HERE / "static" / name, media_type=media_type)

    return router
