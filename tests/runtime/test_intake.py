"""Task intake and subscription against the sandbox DSF FHIR server over real mutual TLS.

Tasks that the DSF FHIR server would refuse are written straight into the sandbox's store: the
bridge must refuse them on its own (defence in depth) and fail them with a precise error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dsf_bridge.dsf.authorization import TaskAuthorizer
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.subscription import SubscriptionSettings, TaskSubscription
from dsf_bridge.dsf.tasks import build_task, input_values
from dsf_bridge.dsf.vocabulary import (
    BPMN_MESSAGE_SYSTEM,
    PROCESS_AUTHORIZATION_EXTENSION,
    PROCESS_AUTHORIZATION_SYSTEM,
)
from dsf_bridge.engine import load_process
from dsf_bridge.errors import RemoteError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.gateway import DsfTaskGateway
from dsf_bridge.runtime.intake import SqlCursorStore, TaskIntake
from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.sandbox import resources
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.store import Database
from dsf_bridge.store.tables import AuditEvent, ProcessInstance
from tests.sandbox.harness import (
    LOCAL,
    REMOTE,
    Sandbox,
    sandbox,
    sandbox_ca,
    sandbox_sites,
    task_profile,
)

__all__ = ["sandbox", "sandbox_ca", "sandbox_sites"]

MODEL = Path(__file__).with_name("one_step.bpmn")
CANONICAL = "http://test.org/bpe/Process/oneStep|1.0"
PROFILE = "http://test.org/fhir/StructureDefinition/task-one-step|1.0"


def _authorization(message: str, requester: str) -> dict[str, Any]:
    return {
        "url": PROCESS_AUTHORIZATION_EXTENSION,
        "extension": [
            {"url": "message-name", "valueString": message},
            {"url": "task-profile", "valueCanonical": PROFILE},
            {
                "url": "requester",
                "valueCoding": {"system": PROCESS_AUTHORIZATION_SYSTEM, "code": requester},
            },
            {
                "url": "recipient",
                "valueCoding": {"system": PROCESS_AUTHORIZATION_SYSTEM, "code": "LOCAL_ALL"},
            },
        ],
    }


ACTIVITY_DEFINITION = {
    "resourceType": "ActivityDefinition",
    "meta": {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]},
    "url": "http://test.org/bpe/Process/oneStep",
    "version": "1.0",
    "status": "active",
    "kind": "Task",
    "extension": [
        _authorization("start", "REMOTE_ALL"),
        # Authorized, but the model has no such message (no instance has its business key).
        _authorization("orphan", "REMOTE_ALL"),
        # Only local requesters may send this one.
        _authorization("localOnly", "LOCAL_ALL"),
    ],
}


def task(
    *,
    message: str = "start",
    requester: str = REMOTE,
    recipient: str = LOCAL,
    canonical: str = CANONICAL,
) -> dict[str, Any]:
    return build_task(
        instantiates_canonical=canonical,
        message_name=message,
        profile=PROFILE,
        business_key=None,
        correlation_key=None,
        requester=requester,
        recipient=recipient,
        authored_on=dt.datetime.now(dt.UTC),
    )


@dataclass
class Site:
    sandbox: Sandbox
    local: FhirClient
    remote: FhirClient
    database: Database
    runtime: ProcessRuntime
    intake: TaskIntake
    gateway: DsfTaskGateway
    work: list[str]

    def subscription(self) -> TaskSubscription:
        return TaskSubscription(
            self.local,
            self.sandbox.context(LOCAL),
            self.intake.handle,
            SqlCursorStore(self.database),
            settings=SubscriptionSettings(backoff_initial=0.05, backoff_max=0.2),
        )

    async def server_task(self, task_id: str) -> dict[str, Any]:
        return await self.local.read("Task", task_id)

    def insert_directly(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Bypass the server's own checks, as a faulty or compromised server might."""
        return self.sandbox.server.service.store.create(resource)


@pytest.fixture
async def site(sandbox: Sandbox, database: Database) -> AsyncIterator[Site]:
    local = sandbox.client(LOCAL)
    remote = sandbox.client(REMOTE)
    await local.create(ACTIVITY_DEFINITION)
    await local.create(task_profile(PROFILE))
    gateway = DsfTaskGateway(local, sandbox.context(LOCAL), LOCAL)
    runtime = ProcessRuntime(database, gateway, owner="test")
    work: list[str] = []
    handlers = HandlerRegistry()

    @handlers.service("org.test.Work")
    def do_work(ctx: HandlerContext) -> None:
        task_info = ctx.get("task")
        assert isinstance(task_info, dict)
        work.append(str(task_info["id"]))

    definition = load_process(MODEL.read_bytes(), MODEL.name, resource_version="1.0")
    await runtime.deploy(definition, handlers, plugin="test", model_hash="0" * 64)
    intake = TaskIntake(
        local,
        runtime,
        database,
        local_organization=LOCAL,
        authorizer=TaskAuthorizer(local, LOCAL),
    )
    try:
        yield Site(sandbox, local, remote, database, runtime, intake, gateway, work)
    finally:
        await gateway.aclose()
        await local.aclose()
        await remote.aclose()


def _error(task: dict[str, Any]) -> str:
    outputs = [
        o.get("valueString", "")
        for o in task.get("output") or []
        if any(
            c.get("system") == BPMN_MESSAGE_SYSTEM and c.get("code") == "error"
            for c in (o.get("type") or {}).get("coding") or []
        )
    ]
    assert len(outputs) == 1, task.get("output")
    return str(outputs[0])


async def test_a_remote_task_runs_to_completed(site: Site) -> None:
    created = await site.remote.create(task())
    assert created.id is not None
    received = await site.server_task(created.id)
    await site.intake.handle(received)
    await site.runtime.run_until_idle()

    final = await site.server_task(created.id)
    assert final["status"] == "completed"
    assert site.work == [created.id]
    (business_key,) = input_values(final, "business-key")
    assert business_key
    # Inputs, requester, recipient and canonical untouched apart from the business-key.
    assert final["requester"] == received["requester"]
    assert final["restriction"] == received["restriction"]
    assert final["instantiatesCanonical"] == received["instantiatesCanonical"]
    assert input_values(final, "message-name") == ["start"]


async def test_a_repeated_delivery_is_taken_in_once(site: Site) -> None:
    created = await site.remote.create(task())
    assert created.id is not None
    received = await site.server_task(created.id)
    await site.intake.handle(received)
    await site.intake.handle(received)
    await site.runtime.run_until_idle()
    async with site.database.transaction() as session:
        instances = (await session.execute(select(func.count(ProcessInstance.id)))).scalar_one()
    assert instances == 1
    assert site.work == [created.id]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: task(message="localOnly"), "process not allowed for requester"),
        (lambda: task(recipient=REMOTE), f"not this site's organization {LOCAL}"),
        (
            lambda: task(canonical="http://test.org/bpe/Process/unknown|1.0"),
            "Process not found: http://test.org/bpe/Process/unknown|1.0 is not deployed",
        ),
        (lambda: task(canonical="http://test.org/Process/oneStep|1.0"), "is malformed"),
        (lambda: task(message="notAuthorized"), "authorizes no message 'notAuthorized'"),
        (lambda: task(canonical="http://test.org/bpe/Process/oneStep|2.0"), "asks for 2.0"),
        (lambda: task(message="orphan"), "Process with start message-name 'orphan' not found"),
    ],
    ids=[
        "unauthorized-requester",
        "wrong-recipient",
        "unknown-process",
        "malformed-canonical",
        "unknown-message-name",
        "wrong-version",
        "uncorrelated-message",
    ],
)
async def test_refused_tasks_end_failed_with_a_precise_error(
    site: Site, make: Any, expected: str
) -> None:
    stored = site.insert_directly(make())
    await site.intake.handle(stored)
    await site.runtime.run_until_idle()
    final = await site.server_task(stored["id"])
    assert final["status"] == "failed"
    assert expected in _error(final)
    # As the DSF BPE: the business key is added before the Task is failed.
    assert len(input_values(final, "business-key")) == 1
    assert site.work == []


async def test_catch_up_takes_in_tasks_created_while_the_bridge_was_down(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 Tasks, many sharing a millisecond, created before the bridge starts: each once."""
    real_now = resources.now_instant
    stamp = real_now()
    ids = []
    for number in range(500):
        # Two thirds share one millisecond: DSF's strict "gt" catch-up would skip some.
        monkeypatch.setattr(
            resources, "now_instant", real_now if number % 3 == 0 else lambda: stamp
        )
        ids.append(site.insert_directly(task())["id"])
    monkeypatch.setattr(resources, "now_instant", real_now)
    shared = [
        t
        for t in site.sandbox.server.service.store.all("Task")
        if t["meta"]["lastUpdated"] == stamp
    ]
    assert len(shared) >= 333
    subscription = site.subscription()
    handled = await subscription.catch_up()
    assert handled == 500
    # A second catch-up (after a reconnect, say) finds nothing new to start.
    await subscription.catch_up()
    await site.runtime.run_until_idle()

    assert sorted(site.work) == sorted(ids)
    async with site.database.transaction() as session:
        started = (
            await session.execute(
                select(func.count()).where(AuditEvent.action == "instance.started")
            )
        ).scalar_one()
    assert started == 500
    statuses = {(await site.server_task(task_id))["status"] for task_id in ids[:20]}
    assert statuses == {"completed"}


async def test_subscription_reconnects_after_the_server_drops(site: Site) -> None:
    stop = asyncio.Event()
    subscription = site.subscription()
    runner = asyncio.create_task(subscription.run(stop))
    try:
        await asyncio.wait_for(subscription.bound.wait(), 10)
        first = await site.remote.create(task())
        await _until_taken_in(site, first.id)

        # The server goes away; a Task is created while the bridge is cut off.
        server = site.sandbox.server
        port = server.port
        await server.stop()
        missed = site.insert_directly(task())
        restarted = SandboxServer(
            server.service,
            certificate=site.sandbox.sites[LOCAL].server_certificate,
            key=site.sandbox.sites[LOCAL].server_key,
            ca_files=[site.sandbox.sites[LOCAL].ca],
            port=port,
        )
        async with restarted:
            await _until_taken_in(site, missed["id"])
            await asyncio.wait_for(_bound_again(subscription), 10)
            after = await site.remote.create(task())
            await _until_taken_in(site, after.id)
        assert subscription.connections >= 2
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)


async def _bound_again(subscription: TaskSubscription) -> None:
    # Polling: "bound for the second time" is a count, not an event the subscription offers.
    while subscription.connections < 2 or not subscription.bound.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def _until_taken_in(site: Site, task_id: str | None, seconds: float = 10) -> None:
    assert task_id is not None

    async def poll() -> None:
        while True:
            await site.runtime.run_until_idle()
            if task_id in site.work:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), seconds)


async def test_the_task_subscription_is_the_one_with_a_json_payload(site: Site) -> None:
    """As the DSF BPE searches it: a ping-only Subscription for the same criteria beside it
    changes nothing; a second one with a JSON payload is an error naming the count."""
    tag = {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "LOCAL"}]}
    ping_only = {
        "resourceType": "Subscription",
        "meta": tag,
        "status": "active",
        "reason": "a second engine without payload",
        "criteria": "Task?status=requested",
        "channel": {"type": "websocket"},
    }
    await site.local.create(ping_only)
    subscription = site.subscription()
    subscription_id, with_payload = await subscription.find_subscription()
    assert subscription_id == site.sandbox.subscription_id("Task?status=requested")
    assert with_payload is True
    # DSF itself refuses a second Subscription with the same criteria, type and payload: one
    # slipping into the store shows why the BPE insists on exactly one.
    second = {**ping_only, "channel": {"type": "websocket", "payload": "application/fhir+json"}}
    site.insert_directly(second)
    with pytest.raises(RemoteError, match="2 active websocket Subscriptions"):
        await subscription.find_subscription()


async def test_a_task_the_server_will_not_update_fails_or_is_recorded_and_intake_goes_on(
    site: Site,
) -> None:
    """As the DSF BPE: an in-progress PUT the server refuses fails the Task with DSF's words;
    one it refuses to fail as well is recorded (refused) and the next Task is taken in."""
    service = site.sandbox.server.service
    first = site.insert_directly(task())
    service.inject_failures("PUT", f"Task/{first['id']}", [403])
    await site.intake.handle(first)
    final = await site.server_task(first["id"])
    assert final["status"] == "failed"
    assert _error(final).startswith("Unable to update Task to status 'in-progress'")

    second = site.insert_directly(task())
    service.inject_failures("PUT", f"Task/{second['id']}", [403, 403])
    await site.intake.handle(second)  # no exception: one Task cannot stop the site
    assert (await site.server_task(second["id"]))["status"] == "requested"
    async with site.database.transaction() as session:
        refused = (
            await session.execute(select(func.count()).where(AuditEvent.action == "task.refused"))
        ).scalar_one()
    assert refused == 1

    third = await site.remote.create(task())
    assert third.id is not None
    stored = await site.server_task(third.id)
    await site.intake.handle(stored)
    await site.runtime.run_until_idle()
    assert (await site.server_task(third.id))["status"] == "completed"
    assert site.work == [third.id]
    # After a restart the refused Task is tried again (as the DSF BPE takes up every
    # requested Task), and now the server takes it.
    assert await site.intake.recover() == 1
    await site.runtime.run_until_idle()
    assert (await site.server_task(second["id"]))["status"] == "completed"
    assert site.work == [third.id, second["id"]]


async def test_a_401_is_not_a_refusal_of_the_task(site: Site) -> None:
    """The server not knowing our certificate (an allow list being changed) is no verdict on
    the Task: the error goes up, the Task stays requested and claimed for the next round."""
    stored = site.insert_directly(task())
    site.sandbox.server.service.inject_failures("PUT", f"Task/{stored['id']}", [401])
    with pytest.raises(RemoteError):
        await site.intake.handle(stored)
    assert (await site.server_task(stored["id"]))["status"] == "requested"
    await site.intake.handle(stored)
    await site.runtime.run_until_idle()
    assert (await site.server_task(stored["id"]))["status"] == "completed"


async def test_an_outage_while_taking_a_task_in_is_not_a_refusal(site: Site) -> None:
    """A 503 is not the server's verdict on the Task: the error goes up (the subscription
    retries later) and the Task stays requested, claimed for the next round."""
    stored = site.insert_directly(task())
    site.sandbox.server.service.inject_failures("PUT", f"Task/{stored['id']}", [503] * 5)
    with pytest.raises(RemoteError):
        await site.intake.handle(stored)
    assert (await site.server_task(stored["id"]))["status"] == "requested"


async def test_a_result_the_server_refuses_fails_the_task_instead_of_stranding_it(
    site: Site,
) -> None:
    """The completing PUT is refused (an output its profile does not allow, say): the Task is
    failed plainly, saying why, never left in-progress."""
    stored = site.insert_directly(task())
    in_progress = {**stored, "status": "in-progress"}
    in_progress["input"] = [
        *stored["input"],
        {
            "type": {"coding": [{"system": BPMN_MESSAGE_SYSTEM, "code": "business-key"}]},
            "valueString": "bk-refused",
        },
    ]
    await site.local.update(in_progress, if_match=1)
    site.sandbox.server.service.inject_failures("PUT", f"Task/{stored['id']}", [403])
    output = {
        "type": {"coding": [{"system": "http://test.org/fhir/CodeSystem/t", "code": "x"}]},
        "valueString": "a result",
    }
    await site.gateway.complete_task(stored["id"], outputs=[output])
    final = await site.server_task(stored["id"])
    assert final["status"] == "failed"
    assert "the FHIR server refused the result" in _error(final)
    assert output not in (final.get("output") or [])
