"""Sending on the durable runtime over real SQLite and PostgreSQL: send handlers that absorb
delivery failures (``throw_on_failure``), handler services, how a sent Task is recorded."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from dsf_bridge.engine import load_process
from dsf_bridge.errors import RemoteError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry, SendContext
from dsf_bridge.runtime.ports import OutgoingTask
from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.tables import OutboxEntry
from tests.runtime.test_processes import FAST, Clock, FakeGateway

KEY = "testorg_sendOrRecord"
MODEL = b"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="d" targetNamespace="t">
  <bpmn:process id="testorg_sendOrRecord" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="Send" />
    <bpmn:sendTask id="Send" camunda:class="org.test.Send">
      <bpmn:extensionElements>
        <camunda:field name="instantiatesCanonical">
          <camunda:string>http://test.org/bpe/Process/other|1.0</camunda:string>
        </camunda:field>
        <camunda:field name="messageName"><camunda:string>hello</camunda:string></camunda:field>
        <camunda:field name="profile">
          <camunda:string>http://test.org/fhir/StructureDefinition/task-hello|1.0</camunda:string>
        </camunda:field>
      </bpmn:extensionElements>
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:sendTask>
    <bpmn:boundaryEvent id="NotDelivered" attachedToRef="Send">
      <bpmn:outgoing>f3</bpmn:outgoing>
      <bpmn:errorEventDefinition camunda:errorCodeVariable="statusCode"
                                 camunda:errorMessageVariable="errorMessage" />
    </bpmn:boundaryEvent>
    <bpmn:sequenceFlow id="f2" sourceRef="Send" targetRef="Record" />
    <bpmn:sequenceFlow id="f3" sourceRef="NotDelivered" targetRef="Record" />
    <bpmn:serviceTask id="Record" camunda:class="org.test.Record">
      <bpmn:incoming>f2</bpmn:incoming><bpmn:incoming>f3</bpmn:incoming>
      <bpmn:outgoing>f4</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="f4" sourceRef="Record" targetRef="End" />
    <bpmn:endEvent id="End"><bpmn:incoming>f4</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>
"""


def _handlers(absorb: bool, seen: list[tuple[object, object, object]]) -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.message_send("org.test.Send")
    def send(ctx: SendContext) -> None:
        if absorb:
            ctx.throw_on_failure("not-reachable", forbidden="not-allowed")

    @registry.service("org.test.Record")
    def record(ctx: HandlerContext) -> None:
        seen.append((ctx.get("statusCode"), ctx.get("errorMessage"), ctx.services.get("greeting")))

    return registry


async def _run(
    database: Database, failure: Exception | None, *, absorb: bool
) -> tuple[str, list[tuple[object, object, object]], FakeGateway]:
    gateway = FakeGateway(failures=[failure] if failure is not None else [])
    seen: list[tuple[object, object, object]] = []
    runtime = ProcessRuntime(
        database, gateway, owner="a", clock=Clock(), settings=FAST, services={"greeting": "hi"}
    )
    definition = load_process(MODEL, "send.bpmn", resource_version="1.0")
    await runtime.deploy(definition, _handlers(absorb, seen), plugin="test", model_hash="h" * 64)
    instance_id = await runtime.start(
        KEY,
        business_key="bk-1",
        task_id="start-task",
        variables={"target": {"organizationIdentifier": "Site_B"}},
    )
    await runtime.run_until_idle()
    async with database.transaction() as session:
        instance = await repo.load_instance(session, instance_id)
    assert instance is not None
    return instance.status, seen, gateway


async def test_delivered_task_goes_on_and_handlers_see_services(database: Database) -> None:
    status, seen, gateway = await _run(database, None, absorb=True)
    assert status == "completed"
    assert len(gateway.sent) == 1
    assert seen == [(None, None, "hi")]


@pytest.mark.parametrize(
    ("status", "code"), [(403, "not-allowed"), (404, "not-reachable"), (None, "not-reachable")]
)
async def test_refused_or_failed_delivery_throws_the_error_the_handler_chose(
    database: Database, status: int | None, code: str
) -> None:
    failure = RemoteError(f"answered {status}", retryable=False, status=status)
    outcome, seen, gateway = await _run(database, failure, absorb=True)
    assert outcome == "completed"
    assert gateway.sent == []
    [(status_code, message, _)] = seen
    assert status_code == code
    assert f"Sending Task hello to Site_B failed: answered {status}" == message


async def test_without_throw_on_failure_a_failed_delivery_fails_the_instance(
    database: Database,
) -> None:
    failure = RemoteError("answered 403", retryable=False, status=403)
    outcome, seen, gateway = await _run(database, failure, absorb=False)
    assert outcome == "failed"
    assert seen == []
    assert gateway.failed and "answered 403" in gateway.failed[0][1]


class LocationGateway(FakeGateway):
    """Answers a send with the full ``Location`` URL, as the DSF gateway does."""

    async def send_task(self, task: OutgoingTask) -> str:
        await super().send_task(task)
        return f"https://dsf.site-b.example.org:8443/fhir/Task/{'7' * 36}/_history/1"


async def test_a_sent_task_is_recorded_by_its_id_not_its_location(database: Database) -> None:
    """Regression: the Location (over 64 characters) went into tasks_seen.task_id, which
    PostgreSQL refused after the Task was posted, so the instance never moved on."""
    seen: list[tuple[object, object, object]] = []
    gateway = LocationGateway()
    runtime = ProcessRuntime(database, gateway, owner="a", clock=Clock(), settings=FAST)
    definition = load_process(MODEL, "send.bpmn", resource_version="1.0")
    await runtime.deploy(definition, _handlers(False, seen), plugin="test", model_hash="h" * 64)
    instance_id = await runtime.start(
        KEY, business_key="bk-1", variables={"target": {"organizationIdentifier": "Site_B"}}
    )
    await runtime.run_until_idle()
    async with database.transaction() as session:
        instance = await repo.load_instance(session, instance_id)
        outgoing = await repo.get_task_seen(session, "7" * 36, "1", role="outgoing")
    assert instance is not None and instance.status == "completed"
    assert outgoing is not None and outgoing.role == "outgoing"
    assert len(gateway.sent) == 1


async def test_interrupted_leases_do_not_bring_the_giving_up_closer(database: Database) -> None:
    """A send whose lease was given back many times (shutdowns, a lost store) and then meets a
    refusal the network may heal is tried again per ``outbox_retry_delays``: only refused
    tries count towards giving up, not leases."""
    clock = Clock()
    gateway = FakeGateway(failures=[RemoteError("answered 503", retryable=True, status=503)])
    seen: list[tuple[object, object, object]] = []
    runtime = ProcessRuntime(database, gateway, owner="a", clock=clock, settings=FAST)
    definition = load_process(MODEL, "send.bpmn", resource_version="1.0")
    await runtime.deploy(definition, _handlers(True, seen), plugin="test", model_hash="h" * 64)
    instance_id = await runtime.start(
        KEY, business_key="bk-9", variables={"target": {"organizationIdentifier": "Site_B"}}
    )
    await runtime._run_due_jobs()  # the send handler: the Task is queued, not yet posted
    async with database.transaction() as session:
        await session.execute(update(OutboxEntry).values(attempts=9))  # nine interruptions
    await runtime.run_until_idle()  # refused once: retried, not given up
    assert seen == []
    clock.advance(seconds=5)
    await runtime.run_until_idle()
    async with database.transaction() as session:
        instance = await repo.load_instance(session, instance_id)
        failures = (await session.scalars(select(OutboxEntry.failures))).all()
    assert len(gateway.sent) == 1
    assert seen == [(None, None, None)]  # delivered: no error went to the handler
    assert instance is not None and instance.status == "completed"
    assert failures == [1]
