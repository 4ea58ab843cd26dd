"""The admin API over real SQLite and PostgreSQL stores filled by the real runtime."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import select, update

from dsf_bridge.api import create_app, heartbeat_probe
from dsf_bridge.api.diagram import DiagramLibrary
from dsf_bridge.api.fhir import TaskReader
from dsf_bridge.config import ApiSettings
from dsf_bridge.errors import RemoteError
from dsf_bridge.runtime import operations
from dsf_bridge.store import Database, append_event
from dsf_bridge.store.tables import AuditEvent, ProcessInstance
from tests.api.seed import KEY, Seeded, seed
from tests.runtime.test_incidents import KEY as INCIDENT_KEY
from tests.runtime.test_incidents import _runtime as incident_runtime
from tests.runtime.test_incidents import _until_incident as until_incident
from tests.runtime.test_processes import Clock as IncidentClock
from tests.runtime.test_processes import FakeGateway

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Beat:
    heartbeat: dt.datetime | None


@pytest.fixture
async def seeded(database: Database) -> Seeded:
    return await seed(database)


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")  # type: ignore[arg-type]


@pytest.fixture
async def client(database: Database, seeded: Seeded) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        database, ApiSettings(token=SecretStr(TOKEN)), clock=seeded.clock, site="Test_Site"
    )
    async with _client(app) as http:
        yield http


async def test_closed_unless_a_token_is_configured(database: Database) -> None:
    async with _client(create_app(database, ApiSettings())) as http:
        health = await http.get("/health")
        ready = await http.get("/ready")
        refused = [await http.get(path) for path in ("/metrics", "/api/v1/instances", "/ui/")]
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert ready.status_code == 200
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert "set api.token" in refused[1].json()["detail"]


async def test_wrong_or_missing_token_is_refused_with_a_challenge(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.get("/api/v1/instances")
    wrong = await client.get("/api/v1/instances", headers={"Authorization": "Bearer nope"})
    page = await client.get("/ui/")
    basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    browser = await client.get("/ui/", headers={"Authorization": f"Basic {basic}"})
    bearer = await client.get("/api/v1/instances", headers=AUTH)
    assert missing.status_code == wrong.status_code == page.status_code == 401
    # Basic everywhere: a browser prompts for the token on the JSON paths too.
    for refused in (missing, wrong, page):
        assert refused.headers["WWW-Authenticate"].startswith('Basic realm="dsf-bridge admin"')
    assert browser.status_code == bearer.status_code == 200


async def test_instances_newest_first_with_filters_and_paging(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    everything = (await client.get("/api/v1/instances", headers=AUTH)).json()
    ids = [row["id"] for row in everything["instances"]]
    assert ids == [seeded.waiting, seeded.failed, seeded.completed]
    assert everything["next_before"] is None
    statuses = {row["id"]: row["status"] for row in everything["instances"]}
    assert statuses == {
        seeded.waiting: "running",
        seeded.failed: "failed",
        seeded.completed: "completed",
    }
    assert {row["process_key"] for row in everything["instances"]} == {KEY}

    failed = (await client.get("/api/v1/instances?status=failed", headers=AUTH)).json()
    assert [row["id"] for row in failed["instances"]] == [seeded.failed]
    by_key = (await client.get("/api/v1/instances?business_key=bk-done", headers=AUTH)).json()
    assert [row["id"] for row in by_key["instances"]] == [seeded.completed]

    exact = (await client.get("/api/v1/instances?limit=3", headers=AUTH)).json()
    assert exact["next_before"] is None  # a full last page says there is no other
    first = (await client.get("/api/v1/instances?limit=2", headers=AUTH)).json()
    assert first["next_before"] == seeded.failed
    second = (
        await client.get(f"/api/v1/instances?limit=2&before={first['next_before']}", headers=AUTH)
    ).json()
    assert [row["id"] for row in first["instances"] + second["instances"]] == ids
    assert second["next_before"] is None


async def test_instance_detail_explains_where_it_stands(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    waiting = (await client.get(f"/api/v1/instances/{seeded.waiting}", headers=AUTH)).json()
    assert waiting["instance"]["business_key"] == "bk-wait"
    assert [w["message_name"] for w in waiting["waits"]] == ["reply"]
    assert len(waiting["timers"]) == 1
    assert waiting["state"]["tk"]  # the engine's tokens, as stored
    assert [(t["task_id"], t["role"]) for t in waiting["tasks"]][:1] == [("start-wait", "incoming")]
    assert [e["status"] for e in waiting["outbox"]] == ["done"]
    actions = [e["action"] for e in waiting["audit"]]
    assert actions[0] == "instance.started"
    assert "task.sent" in actions
    sequences = [e["sequence"] for e in waiting["audit"]]
    assert sequences == sorted(sequences)

    done = (await client.get(f"/api/v1/instances/{seeded.completed}", headers=AUTH)).json()
    assert done["waits"] == done["timers"] == []
    assert done["instance"]["ended_at"] is not None
    assert "instance.completed" in [e["action"] for e in done["audit"]]
    assert {t["task_id"] for t in done["tasks"]} >= {"start-done", "reply-done"}

    missing = await client.get("/api/v1/instances/nope", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["detail"] == "no process instance nope"
    assert waiting["incidents"] == done["incidents"] == []


async def test_instance_detail_lists_incidents(
    client: httpx.AsyncClient, database: Database, seeded: Seeded
) -> None:
    # The engine marks an execution whose job used up its retries with "x" (the instance keeps
    # running); written here by hand so the API is tested apart from the interpreter.
    before = (await client.get(f"/api/v1/instances/{seeded.waiting}", headers=AUTH)).json()
    state = before["state"]
    token_id = min(state["tk"], key=int)
    element = state["tk"][token_id]["n"]
    state["tk"][token_id]["x"] = {"m": "no <answer>", "e": element, "at": "2026-01-01T00:05:00Z"}
    async with database.transaction() as session:
        await session.execute(
            update(ProcessInstance).where(ProcessInstance.id == seeded.waiting).values(state=state)
        )
    detail = (await client.get(f"/api/v1/instances/{seeded.waiting}", headers=AUTH)).json()
    assert detail["incidents"] == [
        {
            "token": token_id,
            "element_id": element,
            "message": "no <answer>",
            "at": "2026-01-01T00:05:00Z",
        }
    ]
    assert detail["instance"]["status"] == "running"
    page = (await client.get(f"/ui/instances/{seeded.waiting}", headers=AUTH)).text
    assert 'id="incidents"' in page
    assert "incident: no &lt;answer&gt;" in page


async def test_audit_pages_and_verification_detects_tampering(
    client: httpx.AsyncClient, seeded: Seeded, database: Database
) -> None:
    verified = (await client.get("/api/v1/audit/verify", headers=AUTH)).json()
    assert verified["ok"] is True
    total = verified["events"]
    assert total > 5

    page = (await client.get("/api/v1/audit?limit=3", headers=AUTH)).json()
    assert [e["sequence"] for e in page["events"]] == [total, total - 1, total - 2]
    older = (
        await client.get(f"/api/v1/audit?limit=3&before={page['next_before']}", headers=AUTH)
    ).json()
    assert older["events"][0]["sequence"] == total - 3
    subject = (
        await client.get(f"/api/v1/audit?subject=instance/{seeded.failed}", headers=AUTH)
    ).json()
    assert subject["events"]
    assert {e["subject"] for e in subject["events"]} == {f"instance/{seeded.failed}"}

    async with database.transaction() as session:
        await session.execute(
            update(AuditEvent).where(AuditEvent.sequence == 3).values(reason="rewritten")
        )
    broken = (await client.get("/api/v1/audit/verify", headers=AUTH)).json()
    assert broken["ok"] is False
    assert broken["first_bad_sequence"] == 3
    assert "changed after it was written" in broken["problem"]


async def test_verification_names_an_instance_row_changed_behind_the_bridge(
    client: httpx.AsyncClient, seeded: Seeded, database: Database
) -> None:
    verified = (await client.get("/api/v1/audit/verify", headers=AUTH)).json()
    assert (verified["ok"], verified["record_problems"]) == (True, [])
    assert verified["records"] >= 3  # the three instances, and their Tasks
    async with database.transaction() as session:
        await session.execute(
            update(ProcessInstance)
            .where(ProcessInstance.id == seeded.failed)
            .values(status="completed")
        )
    broken = (await client.get("/api/v1/audit/verify", headers=AUTH)).json()
    assert (broken["ok"], broken["problem"]) == (False, None)
    [problem] = broken["record_problems"]
    assert problem.startswith(f"process instance {seeded.failed} was changed after event")
    assert problem.endswith("status is 'completed', recorded 'failed'")
    page = (await client.get("/ui/audit?verify=true", headers=AUTH)).text
    assert "Hash chain intact, but rows differ from their records" in page
    assert f"Record broken: process instance {seeded.failed} was changed" in page


async def test_tasks_list_includes_intake_failures_without_instance(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    incoming = (await client.get("/api/v1/tasks?role=incoming", headers=AUTH)).json()["tasks"]
    assert {t["role"] for t in incoming} == {"incoming"}
    assert {"start-wait", "start-late", "start-done", "reply-done"} <= {
        t["task_id"] for t in incoming
    }
    outgoing = (await client.get("/api/v1/tasks?role=outgoing", headers=AUTH)).json()["tasks"]
    assert len(outgoing) == 3  # one request per instance
    bad = await client.get("/api/v1/tasks?role=sideways", headers=AUTH)
    assert bad.status_code == 422
    # A status is one of the intake's: another is refused with the list, never a 503.
    claimed = (await client.get("/api/v1/tasks?status=claiming", headers=AUTH)).json()["tasks"]
    assert all(t["status"] == "claiming" for t in claimed)
    unknown = await client.get("/api/v1/tasks?status=completed", headers=AUTH)
    assert unknown.status_code == 422
    assert "claiming" in unknown.text
    # The web page's field is free text: an unknown status lists nothing.
    page = await client.get("/ui/tasks?status=completed", headers=AUTH)
    assert page.status_code == 200
    assert "start-wait" not in page.text
    assert "start-wait" in (await client.get("/ui/tasks", headers=AUTH)).text


async def test_metrics_count_the_store_in_prometheus_format(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    response = await client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    for status in ("running", "completed", "failed"):
        assert samples[("dsf_bridge_instances", (("process", KEY), ("status", status)))] == 1
    assert samples[("dsf_bridge_timers", ())] == 1
    assert samples[("dsf_bridge_outbox_entries", (("status", "done"),))] >= 3
    assert samples[("dsf_bridge_probe_ok", (("kind", "database"), ("probe", "database")))] == 1
    assert samples[("dsf_bridge_audit_events", ())] > 5


async def test_ready_fails_when_a_heartbeat_is_stale_or_missing(database: Database) -> None:
    now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
    fresh = Beat(now - dt.timedelta(seconds=10))
    stale = Beat(now - dt.timedelta(seconds=120))
    never = Beat(None)
    probes = [
        heartbeat_probe("workers", lambda: fresh, 60, kind="worker", clock=lambda: now),
        heartbeat_probe(
            "subscription Task", lambda: stale, 60, kind="subscription", clock=lambda: now
        ),
        heartbeat_probe(
            "subscription QR", lambda: never, 60, kind="subscription", clock=lambda: now
        ),
        heartbeat_probe("not started", lambda: None, 60, kind="worker", clock=lambda: now),
    ]
    app = create_app(database, ApiSettings(token=SecretStr(TOKEN)), probes=probes)
    async with _client(app) as http:
        ready = await http.get("/ready")
        fresh.heartbeat = stale.heartbeat = never.heartbeat = now
        again = await http.get("/ready")
        metrics = await http.get("/metrics", headers=AUTH)
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready"
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["database"]["ok"] and checks["workers"]["ok"]
    assert checks["subscription Task"]["detail"] == "last sign of life 120 s ago (limit 60 s)"
    assert checks["subscription QR"]["detail"] == "no sign of life yet"
    assert checks["not started"]["detail"] == "no sign of life yet"
    assert again.status_code == 503  # "not started" still has no source
    assert {c["name"] for c in again.json()["checks"] if not c["ok"]} == {"not started"}
    assert 'dsf_bridge_heartbeat_age_seconds{kind="worker",probe="workers"} 0.0' in metrics.text


async def test_a_store_that_is_gone_gives_503_and_metrics_that_say_so() -> None:
    database = Database("postgresql://nobody@127.0.0.1:1/none", read_only=True)
    try:
        app = create_app(database, ApiSettings(token=SecretStr(TOKEN)))
        async with _client(app) as http:
            ready = await http.get("/ready")
            metrics = await http.get("/metrics", headers=AUTH)
            listing = await http.get("/api/v1/instances", headers=AUTH)
            page = await http.get("/ui/", headers=AUTH)
    finally:
        await database.dispose()
    assert ready.status_code == 503
    (check,) = ready.json()["checks"]
    assert check["name"] == "database"
    assert check["detail"].startswith("the store does not answer: database unavailable")
    assert metrics.status_code == 200  # a scrape still reports the failing probe
    assert 'dsf_bridge_probe_ok{kind="database",probe="database"} 0.0' in metrics.text
    assert "dsf_bridge_instances" not in metrics.text
    for response in (listing, page):
        assert response.status_code == 503
        assert response.json()["detail"].startswith("the store does not answer")
        assert response.headers["X-Frame-Options"] == "DENY"


async def test_a_store_that_hangs_leaves_metrics_that_say_so_within_a_probe_timeout() -> None:
    """A PostgreSQL that accepts connections and never answers (a network partition, a
    server stuck in I/O): the scrape answers within the probe timeout with the failing probe,
    instead of waiting out the driver's timeouts (over two minutes) past Prometheus's scrape
    timeout, which loses every metric."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    database = Database(f"postgresql://nobody@127.0.0.1:{port}/none", read_only=True)
    try:
        app = create_app(database, ApiSettings(token=SecretStr(TOKEN)))
        async with _client(app) as http:
            started = asyncio.get_running_loop().time()
            metrics = await asyncio.wait_for(http.get("/metrics", headers=AUTH), 30)
            took = asyncio.get_running_loop().time() - started
    finally:
        for writer in held:
            writer.close()
        server.close()
        await database.dispose()
    assert metrics.status_code == 200
    assert took < 15
    assert 'dsf_bridge_probe_ok{kind="database",probe="database"} 0.0' in metrics.text
    assert "dsf_bridge_instances" not in metrics.text


async def test_bad_parameters_are_client_errors(client: httpx.AsyncClient) -> None:
    too_big = await client.get(f"/api/v1/audit?before={2**64}", headers=AUTH)
    page_too_big = await client.get(f"/ui/audit?before={2**64}", headers=AUTH)
    nul_query = await client.get("/api/v1/instances?status=%00", headers=AUTH)
    nul_path = await client.get("/api/v1/instances/a%00b", headers=AUTH)
    limit = await client.get("/api/v1/instances?limit=501", headers=AUTH)
    assert too_big.status_code == page_too_big.status_code == limit.status_code == 422
    assert nul_query.status_code == nul_path.status_code == 400
    assert nul_query.json()["detail"] == "the request contains a NUL character"


async def test_pages_escape_what_they_show_and_send_strict_headers(database: Database) -> None:
    hostile = await seed(database, business_key_prefix="<script>alert(1)</script>")
    app = create_app(database, ApiSettings(token=SecretStr(TOKEN)), clock=hostile.clock)
    async with _client(app) as http:
        listing = await http.get("/ui/", headers=AUTH)
        detail = await http.get(f"/ui/instances/{hostile.waiting}", headers=AUTH)
        missing = await http.get("/ui/instances/nope", headers=AUTH)
        api = await http.get("/api/v1/instances", headers=AUTH)
    assert listing.status_code == detail.status_code == 200
    for page in (listing, detail):
        assert "<script>alert(1)</script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"
    assert missing.status_code == 404
    assert api.headers["Cache-Control"] == "no-store"
    assert api.headers["X-Content-Type-Options"] == "nosniff"


async def test_openapi_document_lists_the_audit_routes(client: httpx.AsyncClient) -> None:
    closed = await client.get("/api/v1/openapi.json")
    document = (await client.get("/api/v1/openapi.json", headers=AUTH)).json()
    assert closed.status_code == 401
    assert {"/health", "/ready", "/api/v1/instances/{instance_id}", "/api/v1/audit"} <= set(
        document["paths"]
    )
    assert not any(path.startswith("/ui") for path in document["paths"])


async def test_instance_detail_lists_the_newest_500_events_and_says_so(
    client: httpx.AsyncClient, seeded: Seeded, database: Database
) -> None:
    async with database.transaction() as session:
        for n in range(501):
            await append_event(
                session,
                actor="test",
                subject=f"instance/{seeded.waiting}",
                action="test.noted",
                reason=f"note {n}",
            )
    detail = (await client.get(f"/api/v1/instances/{seeded.waiting}", headers=AUTH)).json()
    page = await client.get(f"/ui/instances/{seeded.waiting}", headers=AUTH)
    assert detail["audit_truncated"] is True
    assert detail["tasks_truncated"] is False
    reasons = [event["reason"] for event in detail["audit"]]
    assert len(reasons) == 500
    assert reasons[-1] == "note 500"  # the newest kept, still oldest first
    assert 'id="audit-truncated"' in page.text


async def test_tasks_page_through_with_a_cursor(client: httpx.AsyncClient) -> None:
    everything = (await client.get("/api/v1/tasks?limit=500", headers=AUTH)).json()
    assert everything["next_before"] is None
    paged: list[dict[str, object]] = []
    before = ""
    while True:
        page = (await client.get(f"/api/v1/tasks?limit=2{before}", headers=AUTH)).json()
        assert len(page["tasks"]) <= 2
        paged += page["tasks"]
        if page["next_before"] is None:
            break
        before = f"&before={page['next_before']}"
    assert paged == everything["tasks"]  # same order, nothing twice, nothing left out
    assert len(paged) > 4
    gone = await client.get("/api/v1/tasks?before=incoming:no-such-task:1", headers=AUTH)
    assert gone.json() == {"tasks": [], "next_before": None}
    mine = (await client.get("/api/v1/tasks?instance=nope", headers=AUTH)).json()
    assert mine["tasks"] == []


async def test_a_task_says_its_message_requester_status_and_failure(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    """Issue 15: the bridge's last word on a Task, not the intake's in-progress."""

    async def facts(task_id: str) -> dict[str, dict[str, object]]:
        body = (await client.get(f"/api/v1/tasks/{task_id}", headers=AUTH)).json()
        roles = {f["role"] for f in body["facts"]}
        expected = (
            "the API has no access to the FHIR server"
            if "incoming" in roles
            else "only Tasks taken in are read"
        )
        assert body["server"]["unavailable"].startswith(expected)
        return {f["role"]: f for f in body["facts"]}

    late = (await facts("start-late"))["incoming"]
    assert late["message_name"] == "start"
    assert late["requester"] == "local"  # the audit actor of the start
    assert late["last_status"] == "failed"
    assert late["status_source"] == "set failed by the bridge"
    assert "no reply within 5 minutes" in str(late["failure"])
    done = (await facts("start-done"))["incoming"]
    assert (done["last_status"], done["failure"]) == ("completed", None)
    reply = (await facts("reply-done"))["incoming"]
    assert reply["message_name"] == "reply"
    assert reply["last_status"] == "completed"
    waiting = (await facts("start-wait"))["incoming"]
    assert waiting["last_status"] == "in-progress"
    sent = (await client.get("/api/v1/tasks?role=outgoing&limit=1", headers=AUTH)).json()
    [request] = sent["tasks"]
    outgoing = (await facts(request["task_id"]))["outgoing"]
    assert (outgoing["message_name"], outgoing["last_status"]) == ("request", "requested")
    assert outgoing["status_source"] == "as sent"
    detail = (await client.get("/api/v1/tasks/start-late", headers=AUTH)).json()
    assert detail["instances"] == [seeded.failed]
    assert [e["action"] for e in detail["audit"]] == ["instance.started"]
    missing = await client.get("/api/v1/tasks/nope", headers=AUTH)
    assert missing.status_code == 404


async def test_every_task_link_of_the_pages_lands_on_the_task(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/ui/tasks?limit=500", headers=AUTH)).text
    links = set(re.findall(r'href="(/ui/tasks/[^"]+)"', listing))
    assert len(links) >= 6
    for link in links:
        page = await client.get(link, headers=AUTH)
        assert page.status_code == 200, link
        assert "No audit event" not in page.text, link
        assert 'id="task-versions"' in page.text
    assert "in-progress</span>" not in listing.split("start-late", 1)[1].split("</tr>")[0]
    late_row = listing.split("Task/start-late", 1)[1].split("</tr>")[0]
    assert '<span class="status failed">failed</span>' in late_row
    assert "set failed by the bridge" in late_row
    assert "no reply within 5 minutes" in late_row
    assert (await client.get("/ui/tasks/nope", headers=AUTH)).status_code == 404


async def test_the_server_status_wins_over_the_store_when_it_can_be_read(
    database: Database, seeded: Seeded
) -> None:
    """Beside a running bridge, the lists show what the FHIR server says (read through the
    bridge's client: an in-memory fake of its ``read`` here), and why not when it cannot."""

    async def read(task_id: str) -> dict[str, object]:
        if task_id == "start-wait":
            return {
                "resourceType": "Task",
                "id": task_id,
                "status": "completed",  # completed on the server meanwhile
                "requester": {
                    "identifier": {
                        "system": "http://dsf.dev/sid/organization-identifier",
                        "value": "Hospital_B",
                    }
                },
                "input": [
                    {
                        "type": {
                            "coding": [
                                {
                                    "system": "http://dsf.dev/fhir/CodeSystem/bpmn-message",
                                    "code": "message-name",
                                }
                            ]
                        },
                        "valueString": "start",
                    }
                ],
                "instantiatesCanonical": "http://test.org/bpe/Process/requestReply|1.0",
            }
        if task_id == "start-done":
            await asyncio.sleep(5)  # longer than the reader waits
        raise RemoteError("HTTP 403 forbidden", status=403)

    app = create_app(
        database,
        ApiSettings(token=SecretStr(TOKEN)),
        clock=seeded.clock,
        task_reader=TaskReader(read, timeout=0.5),
    )
    async with _client(app) as http:
        listing = (await http.get("/ui/tasks?role=incoming", headers=AUTH)).text
        api = (await http.get("/api/v1/tasks/start-wait", headers=AUTH)).json()
    wait_row = listing.split("Task/start-wait", 1)[1].split("</tr>")[0]
    assert '<span class="status completed">completed</span>' in wait_row
    assert "on the FHIR server" in wait_row
    assert "organization:Hospital_B" in wait_row
    done_row = listing.split("Task/start-done", 1)[1].split("</tr>")[0]
    assert "no answer from the FHIR server within 0.5 s" in done_row
    assert "set completed by the bridge" in done_row
    late_row = listing.split("Task/start-late", 1)[1].split("</tr>")[0]
    assert "not read from the FHIR server: HTTP 403 forbidden" in late_row
    assert api["server"]["status"] == "completed"
    assert api["server"]["requester"] == "organization:Hospital_B"
    assert api["server"]["message_name"] == "start"


async def test_process_versions_with_their_instance_counts(client: httpx.AsyncClient) -> None:
    [definition] = (await client.get("/api/v1/definitions", headers=AUTH)).json()
    assert definition["process_key"] == KEY
    assert definition["version"] == "1.0"
    assert definition["instances"] == {"running": 1, "completed": 1, "failed": 1}
    assert definition["total"] == 3
    page = (await client.get("/ui/processes", headers=AUTH)).text
    assert f'href="/ui/?process={KEY}&amp;status=failed">1</a>' in page
    assert f'href="/ui/?process={KEY}">3</a>' in page


async def test_without_a_writable_store_the_operator_cannot_act(database: Database) -> None:
    """``dsf-bridge api serve`` (no bridge runs the requests, no writable connection): the
    operator token reads, its actions answer 403 saying why (not 503 "the store does not
    answer"), and the page offers no forms that could only fail."""
    clock = IncidentClock()
    runtime = await incident_runtime(database, FakeGateway(), clock)
    instance = await runtime.start(
        INCIDENT_KEY, message_name="start", business_key="bk-s", variables={"mode": "idle"}
    )
    [incident] = await until_incident(runtime, database, clock)
    operator = "operator-token-for-tests"
    app = create_app(
        database,
        ApiSettings(token=SecretStr(TOKEN), operator_token=SecretStr(operator)),
        clock=clock,
    )
    as_operator = {"Authorization": f"Bearer {operator}"}
    async with _client(app) as http:
        listed = await http.get("/api/v1/incidents", headers=as_operator)
        cancel = await http.post(
            f"/api/v1/instances/{instance}/cancel", json={"reason": "x"}, headers=as_operator
        )
        retry = await http.post(
            f"/api/v1/instances/{instance}/incidents/{incident.token}/retry",
            json={"retries": 1},
            headers=as_operator,
        )
        page = await http.get("/ui/incidents", headers=as_operator)
        detail = await http.get(f"/ui/instances/{instance}", headers=as_operator)
    assert listed.status_code == page.status_code == detail.status_code == 200
    assert cancel.status_code == retry.status_code == 403
    assert "dsf-bridge api serve" in cancel.json()["detail"]
    assert 'id="incident-list"' in page.text
    assert '<form method="post"' not in page.text
    assert '<form method="post"' not in detail.text


async def test_the_operator_retries_and_cancels_from_the_web_page(database: Database) -> None:
    """Issue 15: incidents on the web page, with retry and cancel for the operator token alone;
    each form carries a MAC under the operator token, so a cross-site post cannot act."""
    clock = IncidentClock()
    runtime = await incident_runtime(database, FakeGateway(), clock)
    retried = await runtime.start(
        INCIDENT_KEY, message_name="start", business_key="bk-r", variables={"mode": "idle"}
    )
    cancelled = await runtime.start(
        INCIDENT_KEY, message_name="start", business_key="bk-x", variables={"mode": "idle"}
    )
    incidents = await until_incident(runtime, database, clock)
    while len(incidents) < 2:
        incidents = await until_incident(runtime, database, clock)
    [incident] = [i for i in incidents if i.instance_id == retried]
    operator = "operator-token-for-tests"
    app = create_app(
        database,
        ApiSettings(token=SecretStr(TOKEN), operator_token=SecretStr(operator)),
        clock=clock,
        operator_database=database,
    )
    as_operator = {
        "Authorization": "Basic " + base64.b64encode(b"alice:" + operator.encode()).decode()
    }
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with _client(app) as http:
        read_view = (await http.get("/ui/incidents", headers=AUTH)).text
        assert 'id="incident-list"' in read_view
        assert "<form" not in read_view.split("<main>", 1)[1].split("incident-list", 1)[1]
        assert "Sign in with the operator token" in read_view
        page = (await http.get("/ui/incidents", headers=as_operator)).text
        tokens = dict(
            re.findall(
                r'action="(/ui/instances/[^"]+)">\s*<input type="hidden" name="form" '
                r'value="([0-9a-f]{64})"',
                page,
            )
        )
        retry_path = f"/ui/instances/{retried}/incidents/{incident.token}/retry"
        cancel_path = f"/ui/instances/{cancelled}/cancel"
        assert {retry_path, cancel_path} <= set(tokens)
        # The retry form names the incident's moment, under the MAC too.
        moment = operations.incident_moment(incident.at)
        assert moment
        at = "at=" + quote(moment)
        assert f'name="at" value="{moment}"' in page
        moved = await http.post(  # another moment than the form's MAC covers
            retry_path,
            content=f"form={tokens[retry_path]}&at=2000-01-01T00%3A00%3A00%2B00%3A00",
            headers={**as_operator, **form},
        )
        assert moved.status_code == 403
        instance_page = (await http.get(f"/ui/instances/{retried}", headers=as_operator)).text
        assert f'action="{retry_path}"' in instance_page  # the instance's incidents too
        assert tokens[retry_path] in instance_page
        read_instance = (await http.get(f"/ui/instances/{retried}", headers=AUTH)).text
        assert f'action="{retry_path}"' not in read_instance
        reader = await http.post(
            retry_path, content=f"form={tokens[retry_path]}&{at}", headers={**AUTH, **form}
        )
        assert reader.status_code == 401
        forged = await http.post(
            retry_path, content="form=" + "0" * 64, headers={**as_operator, **form}
        )
        assert forged.status_code == 403
        swapped = await http.post(  # a MAC is bound to its action and instance
            cancel_path,
            content=f"form={tokens[retry_path]}&reason=x",
            headers={**as_operator, **form},
        )
        assert swapped.status_code == 403
        as_json = await http.post(
            retry_path,
            json={"form": tokens[retry_path]},
            headers=as_operator,
        )
        assert as_json.status_code == 415
        blank = await http.post(
            cancel_path,
            content=f"form={tokens[cancel_path]}&reason=+",
            headers={**as_operator, **form},
        )
        assert blank.status_code == 422
        queued = await http.post(
            retry_path,
            content=f"form={tokens[retry_path]}&{at}&retries=2",
            headers={**as_operator, **form},
        )
        assert queued.status_code == 200
        assert 'id="queued"' in queued.text
        assert "api:alice" in queued.text
        cancel = await http.post(
            cancel_path,
            content=f"form={tokens[cancel_path]}&reason=wrong+study",
            headers={**as_operator, **form},
        )
        assert cancel.status_code == 200
    await runtime.run_until_idle()
    async with database.transaction() as session:
        actors = {
            (row.action, row.actor, row.reason)
            for row in (await session.execute(select(AuditEvent))).scalars()
            if row.action in ("incident.retried", "instance.cancelled")
        }
    assert {(action, actor) for action, actor, _ in actors} == {
        ("incident.retried", "api:alice"),
        ("instance.cancelled", "api:alice"),
    }
    assert any("wrong study" in reason for _, _, reason in actors)


async def test_every_link_of_the_web_page_lands_on_something(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    """Issue 15: follow every link from the instance list, breadth first, and each answers 200
    with a page that has something to show (never "No audit event matches" for a Task)."""
    queue, seen = ["/ui/"], {"/ui/"}
    visited = 0
    while queue and visited < 150:
        path = queue.pop(0)
        page = await client.get(path, headers=AUTH)
        visited += 1
        assert page.status_code == 200, path
        if "/ui/tasks/" in path or "subject=Task/" in path:
            assert "No audit event matches" not in page.text, path
        if not page.headers["content-type"].startswith("text/html"):
            continue
        for href in re.findall(r'href="(/[^"]*)"', page.text):
            link = href.replace("&amp;", "&")
            if link.startswith("/ui/static/") or link in seen:
                continue
            seen.add(link)
            queue.append(link)
    assert visited > 20
    assert any(link.startswith("/ui/tasks/") for link in seen)
    assert f"/ui/instances/{seeded.failed}" in seen
    assert "/ui/processes" in seen
    assert "/ui/incidents" in seen


async def test_the_instance_list_says_who_started_each_and_why_it_failed(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    listing = (await client.get("/ui/", headers=AUTH)).text
    rows = {
        instance_id: listing.split(f"/ui/instances/{instance_id}", 1)[1].split("</tr>")[0]
        for instance_id in (seeded.failed, seeded.completed, seeded.waiting)
    }
    failed = rows[seeded.failed]
    assert '<td class="requester">local</td>' in failed  # the start's audit actor
    assert '<td class="message">start</td>' in failed
    assert "no reply within 5 minutes" in failed
    assert '<td class="error failure"></td>' in rows[seeded.completed]
    assert '<td class="error failure"></td>' in rows[seeded.waiting]


async def test_the_instance_pages_mark_the_diagram(database: Database, seeded: Seeded) -> None:
    diagrams = DiagramLibrary()
    diagrams.add(Path(__file__).parents[1] / "runtime" / "request_reply.bpmn", version="1.0")
    app = create_app(
        database, ApiSettings(token=SecretStr(TOKEN)), clock=seeded.clock, diagrams=diagrams
    )

    async def marks(instance_id: str) -> dict[str, str]:
        page = (await http.get(f"/ui/instances/{instance_id}", headers=AUTH)).text
        found = re.findall(
            r'<g class="(?:element|flow) (\w+)(?: (\w+))?" data-element="(\w+)"', page
        )
        return {element: mark for _kind, mark, element in found if mark}

    async with _client(app) as http:
        failed, done, waiting = (
            await marks(seeded.failed),
            await marks(seeded.completed),
            await marks(seeded.waiting),
        )
        closed = create_app(database, ApiSettings(token=SecretStr(TOKEN)), clock=seeded.clock)
        async with _client(closed) as bare:
            note = (await bare.get(f"/ui/instances/{seeded.failed}", headers=AUTH)).text
    assert failed["HandleTimeout"] == "failed"
    assert failed["Timeout"] == failed["f7"] == failed["Start"] == "completed"
    assert "StoreResult" not in failed and "TimedOut" not in failed
    assert done["StoreResult"] == done["Done"] == done["f8"] == "completed"
    assert "HandleTimeout" not in done and "Timeout" not in done
    assert waiting == {
        "Start": "completed",
        "Prepare": "completed",
        "SendRequest": "completed",
        "Wait": "active",
        "Reply": "active",
        "Timeout": "active",
        "f1": "completed",
        "f2": "completed",
        "f3": "completed",
    }
    assert 'id="diagram"' not in note
    assert "no deployed plugin here has a model for testorg_requestReply" in note
