"""Task intake and subscription against the sandbox DSF FHIR server over real mutual TLS.

Tasks that the DSF FHIR server would refuse are written straight into the sandbox's store: the
bridge must refuse them on its own (defence in depth) and fail them with a precise error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
import structlog.testing
from sqlalchemy import event, func, select, update

from dsf_bridge.dsf.authorization import TaskAuthorizer
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.subscription import (
    ResourceDeferredError,
    SubscriptionSettings,
    TaskSubscription,
)
from dsf_bridge.dsf.tasks import build_task, input_values, updated_task
from dsf_bridge.dsf.vocabulary import (
    BPMN_MESSAGE_SYSTEM,
    PROCESS_AUTHORIZATION_EXTENSION,
    PROCESS_AUTHORIZATION_SYSTEM,
)
from dsf_bridge.engine import load_process
from dsf_bridge.errors import RemoteError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime import intake as intake_module
from dsf_bridge.runtime.gateway import DsfTaskGateway
from dsf_bridge.runtime.intake import SERVER_ERROR_ATTEMPTS, SqlCursorStore, TaskIntake
from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.sandbox import resources
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.store import Database, verify_chain
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import TaskSeenStatus
from dsf_bridge.store.tables import AuditEvent, ProcessInstance, TaskSeen
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

    def subscription(self, page_size: int = SubscriptionSettings.page_size) -> TaskSubscription:
        return TaskSubscription(
            self.local,
            self.sandbox.context(LOCAL),
            self.intake.handle,
            SqlCursorStore(self.database),
            settings=SubscriptionSettings(
                backoff_initial=0.05, backoff_max=0.2, page_size=page_size
            ),
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
        remember=gateway.remember_task,
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


def _counted_reads(site: Site, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    read = site.local.read

    async def counting(resource_type: str, resource_id: str) -> dict[str, Any]:
        reads.append(f"{resource_type}/{resource_id}")
        return await read(resource_type, resource_id)

    monkeypatch.setattr(site.local, "read", counting)
    return reads


async def test_a_task_is_finished_from_the_copy_its_in_progress_put_returned(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await site.remote.create(task())
    assert created.id is not None
    await site.intake.handle(await site.server_task(created.id))
    reads = _counted_reads(site, monkeypatch)
    await site.runtime.run_until_idle()
    assert reads == []  # no GET before the completing PUT
    assert (await site.server_task(created.id))["status"] == "completed"


async def test_a_task_changed_since_its_in_progress_put_is_read_again_before_finishing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await site.remote.create(task())
    assert created.id is not None
    await site.intake.handle(await site.server_task(created.id))
    current = await site.server_task(created.id)
    await site.local.update(current, if_match=int(current["meta"]["versionId"]))  # a new version
    reads = _counted_reads(site, monkeypatch)
    await site.runtime.run_until_idle()
    assert reads == [f"Task/{created.id}"]  # the stale copy met 412, then one GET
    final = await site.server_task(created.id)
    assert final["status"] == "completed"
    assert int(final["meta"]["versionId"]) == int(current["meta"]["versionId"]) + 2


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


async def test_a_business_key_made_up_for_a_task_is_not_looked_up(site: Site) -> None:
    """A Task without a business key gets a new one (as in the DSF BPE), which no instance
    can have: its start is not guarded by a look for a running instance with it. A Task with
    a business key is."""
    statements: list[str] = []
    event.listen(
        site.database.engine.sync_engine,
        "before_cursor_execute",
        lambda _c, _k, statement, *_a: statements.append(statement),
    )

    async def lookups_for(given: str | None) -> int:
        statements.clear()
        created = await site.remote.create({**task(), **_business_key(given)})
        assert created.id is not None
        await site.intake.handle(await site.server_task(created.id))
        return sum("EXISTS" in s.upper() and "business_key" in s for s in statements)

    assert await lookups_for(None) == 0
    assert await lookups_for("bk-given") == 1
    await site.runtime.run_until_idle()
    assert len(site.work) == 2


def _business_key(key: str | None) -> dict[str, Any]:
    if key is None:
        return {}
    with_key = updated_task(task(), status="requested", business_key=key)
    return {"input": with_key["input"]}


async def test_two_deliveries_at_once_take_the_task_in_once(site: Site) -> None:
    """A websocket frame and a catch-up (or a sweep) deliver the same Task at the same moment:
    the second meets the first at work on the claim and leaves it (``TaskIntake._working``),
    so one PUT, one instance, one log of the Task's receipt."""
    created = await site.remote.create(task())
    assert created.id is not None
    received = await site.server_task(created.id)
    with structlog.testing.capture_logs() as logs:
        await asyncio.gather(site.intake.handle(received), site.intake.handle(received))
    await site.runtime.run_until_idle()
    assert [e["event"] for e in logs].count("task.received") == 1
    async with site.database.transaction() as session:
        instances = (await session.execute(select(func.count(ProcessInstance.id)))).scalar_one()
    assert instances == 1
    assert site.work == [created.id]
    final = await site.server_task(created.id)
    assert (final["status"], final["meta"]["versionId"]) == ("completed", "3")


@pytest.mark.parametrize(("claimed_ago", "taken_here"), [(1, False), (120, True)])
async def test_a_task_another_replica_claimed_moments_ago_is_left_to_it(
    site: Site, claimed_ago: int, taken_here: bool
) -> None:
    """Replicas on one store all receive every Task: the one whose claim came second leaves
    the Task to the first instead of racing its in-progress PUT (work twice, a 412). A claim
    left behind by a crashed replica is older, and taken up."""
    created = await site.remote.create(task())
    assert created.id is not None
    received = await site.server_task(created.id)
    async with site.database.transaction() as session:
        await repo.record_task_seen(
            session,
            task_id=created.id,
            task_version=received["meta"]["versionId"],
            role="incoming",
            status=TaskSeenStatus.CLAIMING,
        )
        await session.execute(
            update(TaskSeen)
            .where(TaskSeen.task_id == created.id)
            .values(seen_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=claimed_ago))
        )
    if taken_here:
        await site.intake.handle(received)
    else:  # left for now: a catch-up keeps its cursor before it and brings it again
        with pytest.raises(ResourceDeferredError, match="another replica"):
            await site.intake.handle(received)
    await site.runtime.run_until_idle()
    status = (await site.server_task(created.id))["status"]
    assert status == ("completed" if taken_here else "requested")
    assert site.work == ([created.id] if taken_here else [])


async def test_losing_the_in_progress_race_with_a_403_is_no_refusal(site: Site) -> None:
    """DSF checks authorization before versions: the replica whose in-progress PUT comes
    second hears 403 (its Task differs from the stored one), not 412. It must not fail the
    Task, nor mark the shared claim lost under the winner: it delivers the Task from the
    server's copy, once (here the winner died right after its PUT)."""
    created = await site.remote.create(task())
    assert created.id is not None
    received = await site.server_task(created.id)
    winner = updated_task(received, status="in-progress", business_key="bk-winner")
    await site.local.update(winner, if_match=1)  # the other replica's PUT
    await site.intake.handle(received)
    await site.runtime.run_until_idle()
    final = await site.server_task(created.id)
    assert final["status"] == "completed"
    assert input_values(final, "business-key") == ["bk-winner"]
    async with site.database.transaction() as session:
        claim = await repo.get_task_seen(session, created.id, "1")
        instances = (await session.execute(select(func.count(ProcessInstance.id)))).scalar_one()
    assert claim is not None and claim.status is TaskSeenStatus.TAKEN_IN
    assert instances == 1
    assert site.work == [created.id]


async def test_an_in_progress_put_repeated_after_its_answer_was_lost_strands_nothing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PUT reached the server but its answer was lost (a read timeout, a proxy's 504);
    the client repeats it and hears 412 (403 on DSF). The Task is ours: it is delivered, not
    left in-progress with no instance."""
    created = await site.remote.create(task())
    assert created.id is not None
    received = await site.server_task(created.id)
    update_task = site.local.update
    lost: list[int] = []

    async def answer_lost(resource: dict[str, Any], **options: Any) -> Any:
        result = await update_task(resource, **options)
        if not lost and resource.get("status") == "in-progress":
            lost.append(1)
            raise RemoteError("PUT failed: 412 Precondition Failed", status=412)
        return result

    monkeypatch.setattr(site.local, "update", answer_lost)
    await site.intake.handle(received)
    await site.runtime.run_until_idle()
    assert lost == [1]
    assert (await site.server_task(created.id))["status"] == "completed"
    assert site.work == [created.id]


async def test_two_replicas_recovering_one_claim_deliver_it_once(site: Site) -> None:
    """A bridge starting beside a running one recovers that one's claim in flight (claims
    carry no owner): both deliver it, and the Task version's record of its delivery lets one
    of them through. The other leaves it; nothing is failed, one instance runs."""
    stored = await _claimed_in_progress(site, "bk-twice")
    claims = await _claims(site)
    await asyncio.gather(*(site.intake._recover(claim) for claim in claims * 2))
    await site.runtime.run_until_idle()
    assert site.work == [stored["id"]]
    assert (await site.server_task(stored["id"]))["status"] == "completed"
    async with site.database.transaction() as session:
        instances = (await session.execute(select(func.count(ProcessInstance.id)))).scalar_one()
    assert instances == 1


async def _claims(site: Site) -> list[repo.TaskSeenRecord]:
    async with site.database.transaction() as session:
        return await repo.tasks_with_status(session, "incoming", TaskSeenStatus.CLAIMING)


async def test_a_task_left_to_a_replica_that_crashed_is_taken_in_by_a_later_catch_up(
    site: Site,
) -> None:
    """The replica that claimed it died: the catch-up that left it keeps its cursor before
    it, so a later one (once the claim is old) takes it in, even after newer Tasks."""
    first = site.insert_directly(task())
    async with site.database.transaction() as session:
        await repo.record_task_seen(
            session,
            task_id=first["id"],
            task_version="1",
            role="incoming",
            status=TaskSeenStatus.CLAIMING,
        )
    subscription = site.subscription()
    assert await subscription.catch_up() == 0
    second = site.insert_directly(task())
    assert await subscription.catch_up() == 1  # the newer one is taken in meanwhile
    async with site.database.transaction() as session:  # the claim grows old
        await session.execute(
            update(TaskSeen)
            .where(TaskSeen.task_id == first["id"])
            .values(seen_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        )
    assert await subscription.catch_up() == 1
    await site.runtime.run_until_idle()
    assert sorted(site.work) == sorted([first["id"], second["id"]])


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
    """150 Tasks, many sharing a millisecond, created before the bridge starts: each once.

    What matters is the ratio to the page size, not the count: with pages of 60, the 100
    Tasks of one millisecond fill more than a whole page and the catch-up reads two and a
    half pages, as 500 Tasks did with the default pages of 200 (at three times the cost)."""
    real_now = resources.now_instant
    stamp = real_now()
    ids = []
    for number in range(150):
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
    assert len(shared) >= 100
    subscription = site.subscription(page_size=60)
    handled = await subscription.catch_up()
    assert handled == 150
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
    assert started == 150
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
    await site.local.update(
        updated_task(stored, status="in-progress", business_key="bk-refused"), if_match=1
    )
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


def _nested(depth: int) -> dict[str, Any]:
    """An extension nested ``depth`` times (two JSON levels each: object and array)."""
    value: dict[str, Any] = {"url": "http://test.org/leaf", "valueString": "x"}
    for _ in range(depth):
        value = {"url": "http://test.org/nested", "extension": [value]}
    return value


async def _audited(site: Site, action: str) -> list[str]:
    async with site.database.transaction() as session:
        reasons = await session.execute(
            select(AuditEvent.reason).where(AuditEvent.action == action)
        )
    return [str(reason) for reason in reasons.scalars()]


async def test_a_task_nested_300_levels_deep_is_failed_and_intake_goes_on(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10: such a Task crashed intake with RecursionError, and again at every restart.
    (The sandbox copies resources by deep copy, which a Java DSF server does not: here it copies
    through JSON, so that it can hold the Task at all.)"""
    monkeypatch.setattr(
        resources, "copy", SimpleNamespace(deepcopy=lambda value: json.loads(json.dumps(value)))
    )
    hostile = task()
    hostile["extension"] = [_nested(300)]
    stored = site.insert_directly(hostile)
    await site.intake.handle(stored)

    final = await site.server_task(stored["id"])
    assert final["status"] == "failed"
    assert "nested more than 64 levels deep" in _error(final)
    assert len(input_values(final, "business-key")) == 1
    assert site.work == []
    assert await site.intake.recover() == 0  # recorded: nothing left for the next start

    after = await site.remote.create(task())
    assert after.id is not None
    await site.intake.handle(await site.server_task(after.id))
    await site.runtime.run_until_idle()
    assert site.work == [after.id]


@pytest.mark.parametrize(
    ("hostile", "expected"),
    [
        ({"note": [{"text": "x" * 70_000}]}, "a string of 70000 characters"),
        ({"note": [{"text": "x" * 60_000}] * 20}, "larger than 1048576 bytes"),
        ({"extension": [_nested(40)]}, "nested more than 64 levels deep"),
        ({"input_count": 200}, "201 inputs"),
        ({"note": [{"text": "a\x00b"}]}, "a string with a NUL character"),
        (
            {"extension": [{"url": "http://test.org/x", "valueDecimal": float("nan")}]},
            "a number that is not finite",
        ),
    ],
    ids=["long-string", "too-large", "too-deep", "too-many-inputs", "nul", "nan"],
)
async def test_tasks_beyond_the_bounds_are_failed_with_the_bound(
    site: Site, hostile: dict[str, Any], expected: str
) -> None:
    made, hostile = task(), dict(hostile)
    count = hostile.pop("input_count", 0)
    made["input"] += [
        {"type": {"coding": [{"system": "http://test.org/t", "code": "x"}]}, "valueString": "v"}
    ] * count
    stored = site.insert_directly({**made, **hostile})
    await site.intake.handle(stored)
    final = await site.server_task(stored["id"])
    assert final["status"] == "failed"
    assert expected in _error(final)
    assert site.work == []


async def test_a_claimed_task_the_server_no_longer_has_is_skipped_at_start_up(
    site: Site,
) -> None:
    """Issue 10: a Task left claiming that the server answers 404 (or 410) for stopped the
    bridge from ever starting. Now it is recorded skipped, with an audit event, and the other
    claims are finished."""
    deleted = site.insert_directly(task())
    waiting = site.insert_directly(task())
    async with site.database.transaction() as session:
        for claimed in (deleted, waiting):
            await repo.record_task_seen(
                session,
                task_id=claimed["id"],
                task_version="1",
                role="incoming",
                status=TaskSeenStatus.CLAIMING,
            )
    assert site.sandbox.server.service.store.delete("Task", deleted["id"])

    assert await site.intake.recover() == 2  # no exception: start-up goes on
    await site.runtime.run_until_idle()
    assert site.work == [waiting["id"]]
    async with site.database.transaction() as session:
        seen = await repo.get_task_seen(session, deleted["id"], "1")
    assert seen is not None
    assert seen.status == "skipped"
    [reason] = await _audited(site, "task.skipped")
    assert f"answers 410 for Task/{deleted['id']}" in reason or "answers 404" in reason
    assert await site.intake.recover() == 0
    # The skip is recorded with its event: put back to claiming behind the bridge's back, the
    # row is named by audit verify.
    async with site.database.transaction() as session:
        assert (await verify_chain(session)).ok
        await session.execute(
            update(TaskSeen).where(TaskSeen.task_id == deleted["id"]).values(status="claiming")
        )
    async with site.database.transaction() as session:
        [problem] = (await verify_chain(session)).record_problems
    assert problem.startswith(f"Task/{deleted['id']} version 1 (incoming) was changed after")
    assert problem.endswith("status is 'claiming', recorded 'skipped'")


async def test_a_business_key_longer_than_its_column_fails_the_task(site: Site) -> None:
    """Issue 10: on PostgreSQL (String(200)) a business key of 201 characters left the Task
    stuck and crashed start-up; SQLite stored it. On both it is failed now, not half-stored."""
    made = build_task(
        instantiates_canonical=CANONICAL,
        message_name="start",
        profile=PROFILE,
        business_key="k" * 201,
        correlation_key=None,
        requester=REMOTE,
        recipient=LOCAL,
        authored_on=dt.datetime.now(dt.UTC),
    )
    stored = site.insert_directly(made)
    await site.intake.handle(stored)
    await site.runtime.run_until_idle()

    final = await site.server_task(stored["id"])
    assert final["status"] == "failed"
    error = _error(final)
    assert "business-key' has 201 characters; this site stores at most 200" in error
    assert "k" * 201 not in error  # reasons name the field, never its value
    assert site.work == []
    async with site.database.transaction() as session:
        instances = (await session.execute(select(func.count(ProcessInstance.id)))).scalar_one()
    assert instances == 0
    assert await site.intake.recover() == 0


async def test_a_nul_in_the_business_key_and_a_malformed_requester_fail_the_task(
    site: Site,
) -> None:
    """PostgreSQL text cannot hold NUL (SQLite can): failed on both, never a crash; and a
    requester whose identifier is not an object reaches authorization, not an AttributeError.

    A DSF server never stores such a requester (HAPI drops the string on parsing), so this one
    is put into the store directly; the sandbox judges the bridge's PUT against the stored Task
    as HAPI would hold it, and the Task ends failed with the reason."""
    made = build_task(
        instantiates_canonical=CANONICAL,
        message_name="start",
        profile=PROFILE,
        business_key="bk\x00x",
        correlation_key=None,
        requester=REMOTE,
        recipient=LOCAL,
        authored_on=dt.datetime.now(dt.UTC),
    )
    stored = site.insert_directly(made)
    await site.intake.handle(stored)
    odd = site.insert_directly(
        {**made, "requester": {"identifier": "x"}} | {"input": made["input"][:1]}
    )
    await site.intake.handle(odd)
    await site.runtime.run_until_idle()
    final = await site.server_task(stored["id"])
    assert final["status"] == "failed"
    assert "business-key' contains a NUL character" in _error(final)
    odd_final = await site.server_task(odd["id"])
    assert odd_final["status"] == "failed"
    assert "Task.requester.identifier is a string, not an object" in _error(odd_final)
    assert site.work == []
    assert await site.intake.recover() == 0


async def test_a_task_the_server_chokes_on_is_skipped_after_bounded_tries_and_blocks_nothing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10: a Task whose in-progress PUT the server answers 500 held up every Task behind
    it in the catch-up, and start-up. Now the catch-up goes on with the others and keeps its
    cursor before that Task; after SERVER_ERROR_ATTEMPTS tries (over SERVER_ERROR_SPAN, here
    no time at all) it is recorded skipped."""
    monkeypatch.setattr(intake_module, "SERVER_ERROR_SPAN", 0.0)
    service = site.sandbox.server.service
    choking = site.insert_directly(task())
    service.inject_failures("PUT", f"Task/{choking['id']}", [500] * 100)
    behind = await site.remote.create(task())
    assert behind.id is not None
    subscription = site.subscription()

    assert await subscription.catch_up() == 1  # the one behind it, taken in
    await site.runtime.run_until_idle()
    assert site.work == [behind.id]
    assert (await site.server_task(choking["id"]))["status"] == "requested"
    # The cursor stays before the choking Task: the next catch-up brings it again.
    cursor = await SqlCursorStore(site.database).load("Task")
    assert cursor is None or cursor < dt.datetime.fromisoformat(
        choking["meta"]["lastUpdated"].replace("Z", "+00:00")
    )
    # A restart meanwhile: recover() meets the same 500 and start-up goes on.
    assert await site.intake.recover() == 1
    for _ in range(SERVER_ERROR_ATTEMPTS - 3):
        await subscription.catch_up()
    async with site.database.transaction() as session:
        seen = await repo.get_task_seen(session, choking["id"], "1")
    assert seen is not None
    assert seen.status == "claiming"
    await subscription.catch_up()  # the last try
    async with site.database.transaction() as session:
        seen = await repo.get_task_seen(session, choking["id"], "1")
    assert seen is not None
    assert seen.status == "skipped"
    [reason] = await _audited(site, "task.skipped")
    assert f"answered 500 {SERVER_ERROR_ATTEMPTS} times" in reason
    assert await subscription.catch_up() == 1  # seen, skipped: the cursor moves past it
    assert await SqlCursorStore(site.database).load("Task") is not None


async def test_a_burst_of_server_errors_skips_nothing(site: Site) -> None:
    """A database outage behind the FHIR server answers 500 for a while: more tries than
    SERVER_ERROR_ATTEMPTS within SERVER_ERROR_SPAN leave the Task claimed, and it is taken in
    once the server answers again."""
    stored = site.insert_directly(task())
    site.sandbox.server.service.inject_failures("PUT", f"Task/{stored['id']}", [500] * 40)
    subscription = site.subscription()
    for _ in range(SERVER_ERROR_ATTEMPTS + 2):
        assert await subscription.catch_up() == 0
    site.sandbox.server.service.clear_failures()
    assert await subscription.catch_up() == 1
    await site.runtime.run_until_idle()
    assert site.work == [stored["id"]]


async def _claimed_in_progress(site: Site, business_key: str) -> dict[str, Any]:
    """A Task a previous run claimed and PUT in-progress, then crashed before delivering."""
    stored = site.insert_directly(task())
    await site.local.update(
        updated_task(stored, status="in-progress", business_key=business_key), if_match=1
    )
    async with site.database.transaction() as session:
        await repo.record_task_seen(
            session,
            task_id=stored["id"],
            task_version="1",
            role="incoming",
            status=TaskSeenStatus.CLAIMING,
        )
    return stored


async def test_a_claim_whose_recovery_meets_a_server_error_is_tried_again(site: Site) -> None:
    """A claim already in-progress on the server (the previous run crashed before delivering
    it) is in no catch-up: a server error while recovering it at start-up defers it, start-up
    goes on, and the sweeps deliver it later."""
    stored = await _claimed_in_progress(site, "bk-deferred")
    site.sandbox.server.service.inject_failures("GET", f"Task/{stored['id']}", [500] * 40)
    assert await site.intake.recover() == 1  # no exception: start-up goes on
    assert await site.intake.retry_deferred() == 1
    site.sandbox.server.service.clear_failures()
    assert await site.intake.retry_deferred() == 0
    await site.runtime.run_until_idle()
    assert site.work == [stored["id"]]
    assert (await site.server_task(stored["id"]))["status"] == "completed"


async def test_one_deferred_claim_that_keeps_failing_holds_up_no_other(site: Site) -> None:
    """The sweeps try every deferred claim: one whose Task the server chokes on (500) waits,
    and the claim deferred after it is delivered. An outage (503: the server away) ends the
    sweep at the first claim instead: every other one would wait out the same back-off."""
    stuck, following = [(await _claimed_in_progress(site, key))["id"] for key in ("a", "b")]
    for task_id in (stuck, following):
        site.sandbox.server.service.inject_failures("GET", f"Task/{task_id}", [500] * 40)
    assert await site.intake.recover() == 2  # both deferred
    site.sandbox.server.service.clear_failures()
    site.sandbox.server.service.inject_failures("GET", f"Task/{stuck}", [503] * 40)
    assert await site.intake.retry_deferred() == 2  # the outage stopped the sweep early
    site.sandbox.server.service.clear_failures()
    site.sandbox.server.service.inject_failures("GET", f"Task/{stuck}", [500] * 40)
    assert await site.intake.retry_deferred() == 1  # the Task the server chokes on waits
    await site.runtime.run_until_idle()
    assert site.work == [following]


async def test_an_outage_is_no_verdict_on_a_task_however_often(site: Site) -> None:
    """503, 502 and 504 say the server is away: they never count towards skipping a Task."""
    stored = site.insert_directly(task())
    site.sandbox.server.service.inject_failures("PUT", f"Task/{stored['id']}", [503] * 100)
    for _ in range(SERVER_ERROR_ATTEMPTS + 2):
        with pytest.raises(RemoteError):
            await site.intake.handle(stored)
    async with site.database.transaction() as session:
        seen = await repo.get_task_seen(session, stored["id"], "1")
    assert seen is not None
    assert seen.status == "claiming"
