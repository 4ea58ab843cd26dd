"""The web page: instances, where each one stands and how it got there, Tasks and the audit chain.

Server-rendered HTML (Jinja2 with autoescaping), no JavaScript and no external assets, so it
works under the strict Content-Security-Policy the app sends and on an air-gapped site.
Everything behind the token guard; the browser asks for it with a Basic prompt.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from dsf_bridge import __version__
from dsf_bridge.api.context import ApiContext
from dsf_bridge.api.security import TokenGuard
from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.state import InstanceStatus, Phase, Wait, WaitKind
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


def ui_router(context: ApiContext, guard: TokenGuard) -> APIRouter:
    """The ``/ui`` pages over the app's :class:`~dsf_bridge.api.app.ApiContext`."""
    env = _environment()
    router = APIRouter(prefix="/ui", dependencies=[Depends(guard)], include_in_schema=False)

    def page(request: Request, template: str, **values: Any) -> HTMLResponse:
        html = env.get_template(template).render(site=context.site, path=request.url.path, **values)
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
        return page(
            request,
            "instances.html",
            rows=rows[:limit],
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
        return page(
            request,
            "instance.html",
            d=detail,
            tokens=describe_state(detail.state),
            variables=sorted(instance_state.process_variables(detail.state).items()),
        )

    @router.get("/tasks")
    async def tasks(
        request: Request,
        role: str | None = None,
        status: str | None = None,
        limit: int = Query(100, ge=1, le=q.MAX_PAGE),
    ) -> HTMLResponse:
        rows = await context.read(
            lambda s: q.list_tasks(s, role=role or None, status=status or None, limit=limit)
        )
        return page(
            request, "tasks.html", rows=rows, filters={"role": role or "", "status": status or ""}
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
