"""Incidents through the durable runtime, on both databases: a job out of retries parks, the
instance and its other branch go on, an operator lists it, retries it or cancels the instance,
and every step is in the audit trail."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy import select

from dsf_bridge.api.app import create_app
from dsf_bridge.config import ApiSettings
from dsf_bridge.engine import load_process
from dsf_bridge.engine import state as instance_state
from dsf_bridge.errors import ProcessExecutionError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime import operations
from dsf_bridge.runtime.processes import FaultPoint, ProcessRuntime
from dsf_bridge.store import Database, queries
from dsf_bridge.store.tables import AuditEvent, Job, ProcessInstance
from tests.runtime.test_processes import FAST, Clock, FakeGateway, _status
from tests.test_cli import run

KEY = "testorg_incident"
MODEL = b"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="incident"
    targetNamespace="http://bpmn.io/schema/bpmn">
  <bpmn:process id="testorg_incident" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start"><bpmn:messageEventDefinition messageRef="m_start" />
    </bpmn:startEvent>
    <bpmn:parallelGateway id="Fork" />
    <bpmn:exclusiveGateway id="Choose" camunda:asyncBefore="true">
      <bpmn:extensionElements>
        <camunda:failedJobRetryTimeCycle>R2/PT10S</camunda:failedJobRetryTimeCycle>
      </bpmn:extensionElements>
    </bpmn:exclusiveGateway>
    <bpmn:serviceTask id="Work" camunda:class="org.test.Work" />
    <bpmn:receiveTask id="Wait" messageRef="m_go" />
    <bpmn:parallelGateway id="Join" />
    <bpmn:endEvent id="End" /><bpmn:endEvent id="Skip" />
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="Fork" />
    <bpmn:sequenceFlow id="f2" sourceRef="Fork" targetRef="Choose" />
    <bpmn:sequenceFlow id="f3" sourceRef="Fork" targetRef="Wait" />
    <bpmn:sequenceFlow id="f4" sourceRef="Choose" targetRef="Work">
      <bpmn:conditionExpression>${mode == 'run'}</bpmn:conditionExpression>
    </bpmn:sequenceFlow>
    <bpmn:sequenceFlow id="f5" sourceRef="Choose" targetRef="Skip">
      <bpmn:conditionExpression>${mode == 'skip'}</bpmn:conditionExpression>
    </bpmn:sequenceFlow>
    <bpmn:sequenceFlow id="f6" sourceRef="Work" targetRef="Join" />
    <bpmn:sequenceFlow id="f7" sourceRef="Wait" targetRef="Join" />
    <bpmn:sequenceFlow id="f8" sourceRef="Join" targetRef="End" />
  </bpmn:process>
  <bpmn:message id="m_start" name="start" />
  <bpmn:message id="m_go" name="go" />
</bpmn:definitions>
"""


@pytest.fixture(name="clock")
def _clock() -> Clock:
    return Clock()


async def _runtime(database: Database, gateway: FakeGateway, clock: Clock) -> ProcessRuntime:
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        ctx.set("worked", True)

    runtime = ProcessRuntime(database, gateway, owner="a", clock=clock, settings=FAST)
    definition = load_process(MODEL, "incident.bpmn", resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="test", model_hash="i" * 64)
    return runtime


async def _until_incident(
    runtime: ProcessRuntime, database: Database, clock: Clock
) -> list[operations.IncidentListing]:
    for _ in range(5):
        await runtime.run_until_idle()
        clock.advance(seconds=10)
    async with database.transaction() as session:
        return await operations.list_incidents(session)


async def _incidents_counted(database: Database) -> tuple[dict[str, int], dict[str, int]]:
    """The open incidents /metrics counts, and each instance's count kept beside its state
    (checked against the state)."""
    async with database.transaction() as session:
        counts = await queries.count_store(session, dt.datetime.now(dt.UTC))
        rows = (
            await session.execute(
                select(ProcessInstance.id, ProcessInstance.incidents, ProcessInstance.state)
            )
        ).all()
    for instance_id, kept, state in rows:
        assert kept == instance_state.incident_count(state), instance_id
    return counts.incidents, {instance_id: kept for instance_id, kept, _ in rows}


async def _actions(database: Database) -> list[str]:
    async with database.transaction() as session:
        return list((await session.scalars(select(AuditEvent.action))).all())


async def test_an_incident_is_listed_retried_by_an_operator_and_the_instance_ends(
    database: Database, clock: Clock
) -> None:
    gateway = FakeGateway()
    runtime = await _runtime(database, gateway, clock)
    instance_id = await runtime.start(
        KEY, message_name="start", business_key="bk-i", task_id="t-i", variables={"mode": "idle"}
    )
    [incident] = await _until_incident(runtime, database, clock)
    assert (incident.instance_id, incident.process, incident.element) == (
        instance_id,
        KEY,
        "Choose",
    )
    assert "exclusive gateway 'Choose'" in incident.message
    assert await _status(database, instance_id) == "running"
    assert await _incidents_counted(database) == ({KEY: 1}, {instance_id: 1})
    actions = await _actions(database)
    assert actions.count("job.failed") == 2  # R2: two tries in all, both undone
    assert "job.continued" not in actions
    assert "incident.created" in actions
    # The other branch goes on and changes what the gateway will see.
    await runtime.correlate(
        message_name="go", business_key="bk-i", task_id="t-go", variables={"mode": "run"}
    )
    async with database.transaction() as session:
        with pytest.raises(ProcessExecutionError, match="no incident at token '99'"):
            await operations.request_retry(
                session, instance_id, "99", retries=1, actor="test", now=clock()
            )
        # A form shown for another incident at this token (one that came back since) acts on
        # nothing: the operator decided on what the page showed then.
        with pytest.raises(ProcessExecutionError, match="is not the one shown"):
            await operations.request_retry(
                session,
                instance_id,
                incident.token,
                retries=1,
                actor="test",
                now=clock(),
                seen_at="2000-01-01T00:00:00+00:00",
            )
        await operations.request_retry(
            session,
            instance_id,
            incident.token,
            retries=1,
            actor="test",
            now=clock(),
            seen_at=operations.incident_moment(incident.at),
        )
    await runtime.run_until_idle()
    assert await _status(database, instance_id) == "completed"
    assert await _incidents_counted(database) == ({}, {instance_id: 0})
    assert sorted(gateway.completed) == ["t-go", "t-i"]
    assert "incident.retried" in await _actions(database)


async def test_a_bug_in_a_jobs_step_runs_it_again_later_and_a_fixed_bridge_finishes_it(
    database: Database, clock: Clock
) -> None:
    """An exception of the bridge's own in a job's step (not a handler's error, which is an
    outcome, nor an engine error, which undoes the step and uses the job's retries) gives the
    job back, its error shown with it, to run again after a back-off that doubles, without
    using a retry: once the bug is gone (a fixed bridge), the instance goes on. Before, it
    escaped the worker's round, stopping the bridge, and the job kept its lease."""
    gateway = FakeGateway()
    runtime = await _runtime(database, gateway, clock)
    crashes: list[str] = []
    buggy = True

    def bug(point: FaultPoint, detail: str) -> None:
        if buggy and point is FaultPoint.STEP_WRITTEN and detail == "job.continued":
            crashes.append(detail)
            raise RuntimeError("a bug in the step")

    runtime.fault_hook = bug
    instance_id = await runtime.start(
        KEY, message_name="start", business_key="bk-bug", task_id="t-b", variables={"mode": "run"}
    )
    waits = []
    for _ in range(4):
        await runtime.run_until_idle()  # never raises: the round goes on
        async with database.transaction() as session:
            job = (
                await session.execute(
                    select(Job.retries_left, Job.last_error, Job.lease_owner, Job.due_at)
                )
            ).one()
        assert job[:3] == (0, "internal error: RuntimeError: a bug in the step", None)
        waits.append((job.due_at - clock()).total_seconds())
        clock.advance(seconds=waits[-1])
    assert len(crashes) == 4
    assert waits == [1.0, 2.0, 4.0, 8.0]  # FAST's 1 s retry delay, doubling
    assert await _incidents_counted(database) == ({}, {instance_id: 0})  # no retry used up
    buggy = False
    await runtime.run_until_idle()
    assert "job.continued" in await _actions(database)
    async with database.transaction() as session:
        assert (await session.scalars(select(Job.kind))).all() == []  # ran, and done
    assert await _status(database, instance_id) == "running"  # now waits for "go"


async def test_an_operator_cancels_an_instance_and_its_tasks_fail_with_the_reason(
    database: Database, clock: Clock
) -> None:
    gateway = FakeGateway()
    runtime = await _runtime(database, gateway, clock)
    instance_id = await runtime.start(
        KEY, message_name="start", business_key="bk-c", task_id="t-c", variables={"mode": "idle"}
    )
    await _until_incident(runtime, database, clock)
    async with database.transaction() as session:
        with pytest.raises(ProcessExecutionError, match="give a reason"):
            await operations.request_cancel(
                session, instance_id, reason="  ", actor="test", now=clock()
            )
        await operations.request_cancel(
            session, instance_id, reason="wrong study", actor="test", now=clock()
        )
    await runtime.run_until_idle()
    assert await _status(database, instance_id) == "failed"
    [(task, message)] = gateway.failed
    assert task == "t-c"
    assert message == "Process instance cancelled by test: wrong study"
    async with database.transaction() as session:
        assert await operations.list_incidents(session) == []
        with pytest.raises(ProcessExecutionError, match="already ended"):
            await operations.request_cancel(
                session, instance_id, reason="again", actor="test", now=clock()
            )


async def test_the_command_line_lists_retries_and_cancels(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bridge.db'}"
    assert (await asyncio.to_thread(run, "db", "upgrade", "--db-url", url)).returncode == 0
    database = Database(url)
    fake_clock = Clock()
    try:
        runtime = await _runtime(database, FakeGateway(), fake_clock)
        instance_id = await runtime.start(
            KEY, message_name="start", business_key="bk-x", variables={"mode": "idle"}
        )
        [incident] = await _until_incident(runtime, database, fake_clock)
    finally:
        await database.dispose()

    instances = await asyncio.to_thread(
        run, "instances", "list", "--status", "running", "--json", "--db-url", url
    )
    assert instances.returncode == 0, instances.stderr
    [listed_instance] = json.loads(instances.stdout)
    assert (listed_instance["id"], listed_instance["process_key"]) == (instance_id, KEY)
    shown = await asyncio.to_thread(run, "instances", "show", instance_id, "--db-url", url)
    assert shown.returncode == 0, shown.stderr
    assert f"incident      token {incident.token} at Choose:" in shown.stdout
    assert "status        running" in shown.stdout
    detail = await asyncio.to_thread(
        run, "instances", "show", instance_id, "--json", "--db-url", url
    )
    assert json.loads(detail.stdout)["incidents"][0]["element_id"] == "Choose"
    missing = await asyncio.to_thread(run, "instances", "show", "nope", "--db-url", url)
    assert missing.returncode == 1
    assert "no instance 'nope'" in missing.stderr
    listed = await asyncio.to_thread(run, "instances", "incidents", "--json", "--db-url", url)
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["instance"], row["token"], row["element"]) == (
        instance_id,
        incident.token,
        "Choose",
    )
    wrong = await asyncio.to_thread(run, "instances", "retry", instance_id, "99", "--db-url", url)
    assert wrong.returncode == 1
    assert "no incident at token '99'" in wrong.stderr
    retried = await asyncio.to_thread(
        run, "instances", "retry", instance_id, incident.token, "--retries", "2", "--db-url", url
    )
    assert retried.returncode == 0, retried.stderr
    assert "queued: 2 new tries" in retried.stdout
    no_reason = await asyncio.to_thread(
        run, "instances", "cancel", instance_id, "--reason", " ", "--db-url", url
    )
    assert no_reason.returncode == 1
    assert "give a reason" in no_reason.stderr


async def test_a_request_that_no_longer_applies_is_refused_not_applied(
    database: Database, clock: Clock
) -> None:
    """Queued while the incident was there; by the time it runs the instance has ended."""
    gateway = FakeGateway()
    runtime = await _runtime(database, gateway, clock)
    instance_id = await runtime.start(
        KEY, message_name="start", business_key="bk-r", task_id="t-r", variables={"mode": "idle"}
    )
    [incident] = await _until_incident(runtime, database, clock)
    async with database.transaction() as session:
        await operations.request_retry(
            session, instance_id, incident.token, retries=1, actor="test", now=clock()
        )
        await operations.request_cancel(
            session, instance_id, reason="first", actor="test", now=clock()
        )
        await operations.request_cancel(
            session, instance_id, reason="second", actor="test", now=clock()
        )
    await runtime.run_until_idle()
    assert await _status(database, instance_id) == "failed"
    actions = await _actions(database)
    # One of the queued requests wins; the ones after it find nothing to do and say so.
    assert actions.count("instance.cancelled") + actions.count("incident.retried") >= 1
    assert actions.count("operator.refused") >= 1
    assert len(gateway.failed) == 1


MANY = b"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="many"
    targetNamespace="http://bpmn.io/schema/bpmn">
  <bpmn:process id="testorg_many" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start"><bpmn:messageEventDefinition messageRef="m_start" />
    </bpmn:startEvent>
    <bpmn:subProcess id="PerTarget">
      <bpmn:multiInstanceLoopCharacteristics camunda:asyncBefore="true"
          camunda:collection="${targets}" camunda:elementVariable="target" />
      <bpmn:startEvent id="S" /><bpmn:serviceTask id="Touch" camunda:class="org.test.Touch" />
      <bpmn:endEvent id="E" />
      <bpmn:sequenceFlow id="s1" sourceRef="S" targetRef="Touch" />
      <bpmn:sequenceFlow id="s2" sourceRef="Touch" targetRef="E" />
    </bpmn:subProcess>
    <bpmn:endEvent id="End" />
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="PerTarget" />
    <bpmn:sequenceFlow id="f2" sourceRef="PerTarget" targetRef="End" />
  </bpmn:process>
  <bpmn:message id="m_start" name="start" />
</bpmn:definitions>
"""


async def test_many_async_executions_of_one_instance_all_finish(
    database: Database, clock: Clock
) -> None:
    """40 multi-instance jobs of one instance race for it: a job that keeps losing the race is
    postponed, never dropped (it used to be, with its retries used up by the conflicts)."""
    registry = HandlerRegistry()
    touched: list[str] = []

    @registry.service("org.test.Touch")
    def touch(ctx: HandlerContext) -> None:
        touched.append(str(ctx.get("target")))

    gateway = FakeGateway()
    runtime = ProcessRuntime(database, gateway, owner="a", clock=clock, settings=FAST)
    await runtime.deploy(
        load_process(MANY, "many.bpmn", resource_version="1.0"),
        registry,
        plugin="test",
        model_hash="m" * 64,
    )
    targets = [f"org-{n}" for n in range(40)]
    instance_id = await runtime.start(
        "testorg_many",
        message_name="start",
        business_key="bk-m",
        task_id="t-m",
        variables={"targets": targets},
    )
    for _ in range(60):
        await runtime.run_until_idle()
        if await _status(database, instance_id) != "running":
            break
        clock.advance(seconds=1)
    assert await _status(database, instance_id) == "completed"
    assert sorted(set(touched)) == sorted(targets)


SIGNALLED_LOOP = b"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="sigloop"
    targetNamespace="http://bpmn.io/schema/bpmn">
  <bpmn:process id="testorg_sigloop" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start"><bpmn:messageEventDefinition messageRef="m_start" />
    </bpmn:startEvent>
    <bpmn:parallelGateway id="Fork" />
    <bpmn:intermediateCatchEvent id="Go"><bpmn:signalEventDefinition signalRef="s_go" />
    </bpmn:intermediateCatchEvent>
    <bpmn:intermediateThrowEvent id="Again" />
    <bpmn:exclusiveGateway id="More" default="back" />
    <bpmn:endEvent id="Done" />
    <bpmn:endEvent id="Throw"><bpmn:signalEventDefinition signalRef="s_go" /></bpmn:endEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="Fork" />
    <bpmn:sequenceFlow id="f2" sourceRef="Fork" targetRef="Go" />
    <bpmn:sequenceFlow id="f3" sourceRef="Fork" targetRef="Throw" />
    <bpmn:sequenceFlow id="f4" sourceRef="Go" targetRef="Again" />
    <bpmn:sequenceFlow id="f5" sourceRef="Again" targetRef="More" />
    <bpmn:sequenceFlow id="back" sourceRef="More" targetRef="Again" />
    <bpmn:sequenceFlow id="out" sourceRef="More" targetRef="Done">
      <bpmn:conditionExpression>${done}</bpmn:conditionExpression>
    </bpmn:sequenceFlow>
  </bpmn:process>
  <bpmn:message id="m_start" name="start" />
  <bpmn:signal id="s_go" name="go-sigloop" />
</bpmn:definitions>
"""


async def test_an_incident_in_the_step_a_signal_continues_is_audited(
    database: Database, clock: Clock
) -> None:
    """The instance throws a signal it catches itself; the path the signal wakes loops: the
    incident of that follow-up step is in the audit trail too."""
    runtime = ProcessRuntime(database, FakeGateway(), owner="a", clock=clock, settings=FAST)
    await runtime.deploy(
        load_process(SIGNALLED_LOOP, "sigloop.bpmn", resource_version="1.0"),
        HandlerRegistry(),
        plugin="test",
        model_hash="s" * 64,
    )
    instance_id = await runtime.start(
        "testorg_sigloop", message_name="start", business_key="bk-s", variables={"done": False}
    )
    await runtime.run_until_idle()
    assert await _status(database, instance_id) == "running"
    async with database.transaction() as session:
        [incident] = await operations.list_incidents(session)
    assert "Path loops without a wait state" in incident.message
    assert (await _actions(database)).count("incident.created") == 1


async def test_the_admin_api_retries_and_cancels_with_the_operator_token_alone(
    database: Database, clock: Clock
) -> None:
    """Issue 10: the admin API's operator endpoints. The read token lists incidents but cannot
    act; the operator token retries an incident and cancels an instance, the audit trail names
    the operator (the Basic user name); no operator token configured: the actions are closed."""
    gateway = FakeGateway()
    runtime = await _runtime(database, gateway, clock)
    retried = await runtime.start(
        KEY, message_name="start", business_key="bk-r", task_id="t-r", variables={"mode": "idle"}
    )
    cancelled = await runtime.start(
        KEY, message_name="start", business_key="bk-x", task_id="t-x", variables={"mode": "idle"}
    )
    incidents = await _until_incident(runtime, database, clock)
    while len(incidents) < 2:
        incidents = await _until_incident(runtime, database, clock)
    [incident] = [i for i in incidents if i.instance_id == retried]

    read, operator = "read-token-for-tests", "operator-token-for-tests"
    app = create_app(
        database,
        ApiSettings(token=SecretStr(read), operator_token=SecretStr(operator)),
        clock=clock,
        operator_database=database,
    )
    closed = create_app(database, ApiSettings(token=SecretStr(read)), clock=clock)
    as_reader = {"Authorization": f"Bearer {read}"}
    as_operator = {
        "Authorization": "Basic " + base64.b64encode(b"alice:" + operator.encode()).decode()
    }
    retry_path = f"/api/v1/instances/{retried}/incidents/{incident.token}/retry"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
        listed = await http.get("/api/v1/incidents", headers=as_reader)
        assert listed.status_code == 200
        assert {i["instance_id"] for i in listed.json()} == {retried, cancelled}
        assert (await http.get("/api/v1/incidents", headers=as_operator)).status_code == 200
        refused = await http.post(retry_path, json={"retries": 1}, headers=as_reader)
        assert refused.status_code == 401
        assert "operator token" in refused.json()["detail"]
        form = await http.post(
            retry_path, content=b"retries=1", headers={**as_operator, "Content-Type": "text/plain"}
        )
        assert form.status_code == 422  # not a JSON body (strict_content_type)
        typeless = await http.post(
            retry_path,
            content=b'{"retries": 1}',
            headers=as_operator,  # no Content-Type at all
        )
        assert typeless.status_code == 422
        unknown = await http.post(
            f"/api/v1/instances/{retried}/incidents/99/retry", json={}, headers=as_operator
        )
        assert unknown.status_code == 409
        assert "no incident at token '99'" in unknown.json()["detail"]
        missing = await http.post(
            "/api/v1/instances/nope/cancel", json={"reason": "x"}, headers=as_operator
        )
        assert missing.status_code == 404
        blank = await http.post(
            f"/api/v1/instances/{cancelled}/cancel", json={"reason": "   "}, headers=as_operator
        )
        assert blank.status_code == 422
        queued = await http.post(retry_path, json={"retries": 1}, headers=as_operator)
        assert queued.status_code == 202
        assert queued.json()["actor"] == "api:alice"
        cancel = await http.post(
            f"/api/v1/instances/{cancelled}/cancel",
            json={"reason": "wrong study"},
            headers={"Authorization": f"Bearer {operator}"},
        )
        assert cancel.status_code == 202
        assert cancel.json()["actor"] == "api:operator"
    closed_transport = httpx.ASGITransport(app=closed)
    async with httpx.AsyncClient(transport=closed_transport, base_url="http://admin") as http:
        shut = await http.post(retry_path, json={"retries": 1}, headers=as_reader)
        assert shut.status_code == 403
        assert "api.operator_token" in shut.json()["detail"]

    await runtime.correlate(
        message_name="go", business_key="bk-r", task_id="t-go", variables={"mode": "run"}
    )
    await runtime.run_until_idle()
    assert await _status(database, retried) == "completed"
    assert await _status(database, cancelled) == "failed"
    assert ("t-x", "Process instance cancelled by api:operator: wrong study") in gateway.failed
    async with database.transaction() as session:
        actors = {
            (row.action, row.actor)
            for row in (await session.execute(select(AuditEvent))).scalars()
            if row.action in ("incident.retried", "instance.cancelled")
        }
    assert actors == {("incident.retried", "api:alice"), ("instance.cancelled", "api:operator")}


def test_the_operator_token_must_differ_from_the_read_token_and_needs_it() -> None:
    with pytest.raises(ValidationError, match="operator_token needs token"):
        ApiSettings(operator_token=SecretStr("operator-token-alone"))
    with pytest.raises(ValidationError, match="operator_token must differ from token"):
        ApiSettings(
            token=SecretStr("same-token-for-both"), operator_token=SecretStr("same-token-for-both")
        )
