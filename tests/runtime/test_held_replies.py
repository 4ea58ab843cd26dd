"""A reply that arrives while its own request's send is unresolved is held durably, never
refused for timing, and delivered once the send resolves, also after a restart (issue 10).

Site A runs the request/reply process and sends its request to site B over the sandbox
network; B answers with a reply Task on A's server, which A's intake takes in."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dsf_bridge.dsf.authorization import TaskAuthorizer
from dsf_bridge.dsf.tasks import build_task, input_values
from dsf_bridge.runtime.intake import HELD, TaskIntake
from dsf_bridge.runtime.ports import OutgoingTask
from dsf_bridge.runtime.processes import TAKEN_IN, ProcessRuntime, RuntimeSettings
from dsf_bridge.sandbox.network import SandboxNetwork
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import TaskSeenStatus
from dsf_bridge.store.tables import AuditEvent, ProcessInstance
from tests.runtime.sending import (
    KEY,
    PROVIDER_DEFINITION,
    SHORT_LEASE,
    activity_definition,
    close,
    runtime_for,
    site_client,
    site_config,
)
from tests.sandbox.harness import task_profile

REQUESTER = "Site_A"
PROVIDER = "Site_B"
REQUEST_PROFILE = "http://test.org/fhir/StructureDefinition/task-request|1.0"
REPLY_PROFILE = "http://test.org/fhir/StructureDefinition/task-reply|1.0"
CANONICAL = "http://test.org/bpe/Process/requestReply|1.0"

REPLY_DEFINITION = activity_definition(
    "http://test.org/bpe/Process/requestReply", "reply", REPLY_PROFILE
)


def _config(net: SandboxNetwork, organization: str) -> dict[str, str]:
    return site_config(net, organization, PROVIDER)


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[SandboxNetwork]:
    async with SandboxNetwork(tmp_path / "net", [REQUESTER, PROVIDER]) as net:
        provider, _ = site_client(_config(net, PROVIDER))
        requester, _ = site_client(_config(net, REQUESTER))
        async with provider, requester:
            await provider.create(PROVIDER_DEFINITION)
            await provider.create(task_profile(REQUEST_PROFILE))
            await requester.create(REPLY_DEFINITION)
            await requester.create(task_profile(REPLY_PROFILE))
        yield net


def _intake(runtime: ProcessRuntime, database: Database, config: dict[str, str]) -> TaskIntake:
    client, _ = site_client(config)
    return TaskIntake(
        client,
        runtime,
        database,
        local_organization=REQUESTER,
        authorizer=TaskAuthorizer(client, REQUESTER),
    )


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _reply_from_provider(net: SandboxNetwork) -> dict[str, Any]:
    """B answers the request it holds with a reply Task on A's server; A's copy of it."""
    (request,) = [
        task
        for task in net.servers[PROVIDER].service.store.all("Task")
        if input_values(task, "message-name") == ["request"]
    ]
    (business_key,) = input_values(request, "business-key")
    provider, _ = site_client({**_config(net, PROVIDER), "base_url": net.base_url(REQUESTER)})
    async with provider:
        created = await provider.create(
            build_task(
                instantiates_canonical=CANONICAL,
                message_name="reply",
                profile=REPLY_PROFILE,
                business_key=str(business_key),
                correlation_key=None,
                requester=PROVIDER,
                recipient=REQUESTER,
                authored_on=dt.datetime.now(dt.UTC),
            )
        )
    assert created.id is not None
    return _on_server(net, created.id)


async def _claim_status(database: Database, task: dict[str, Any]) -> str | None:
    async with database.transaction() as session:
        claim = await repo.get_task_seen(session, task["id"], task["meta"]["versionId"])
    return None if claim is None else claim.status


async def _audited(database: Database, action: str) -> int:
    async with database.transaction() as session:
        rows = await session.execute(select(AuditEvent.sequence).where(AuditEvent.action == action))
        return len(rows.all())


async def _instance_status(database: Database, business_key: str) -> str | None:
    async with database.transaction() as session:
        found = await session.execute(
            select(ProcessInstance.status).where(ProcessInstance.business_key == business_key)
        )
        status: str | None = found.scalar_one_or_none()
    return status


def _on_server(net: SandboxNetwork, task_id: str) -> dict[str, Any]:
    task = net.servers[REQUESTER].service.store.read("Task", task_id)
    assert task is not None
    return task


async def _posted_then_blocked(
    net: SandboxNetwork, database: Database, owner: str, settings: RuntimeSettings | None = None
) -> tuple[ProcessRuntime, Any, asyncio.Event, asyncio.Task[int]]:
    """Site A's runtime whose send posts the request, then waits for ``release`` before the
    commit that records it; the runtime's workers run in the returned task."""
    runtime, gateway = await runtime_for(
        database, _config(net, REQUESTER), owner=owner, settings=settings
    )
    release = asyncio.Event()
    post = gateway.send_task

    async def post_then_wait(task: OutgoingTask) -> str:
        location = await post(task)
        await release.wait()
        return location

    gateway.send_task = post_then_wait  # type: ignore[method-assign]
    await runtime.start(
        KEY,
        message_name="start",
        business_key="bk-held",
        variables={"target": {"organizationIdentifier": PROVIDER}},
    )
    workers = asyncio.create_task(runtime.run_until_idle())

    async def request_posted() -> bool:
        return any(
            input_values(task, "message-name") == ["request"]
            for task in net.servers[PROVIDER].service.store.all("Task")
        )

    await _until(request_posted)
    return runtime, gateway, release, workers


async def _held_then_stopped(net: SandboxNetwork, database: Database, owner: str) -> dict[str, Any]:
    """A bridge holds the provider's reply while its send is unresolved, then stops ("killed":
    its workers stop mid-send, its short lease stays on the queued send); the reply."""
    runtime, gateway, _release, workers = await _posted_then_blocked(
        net, database, owner, SHORT_LEASE
    )
    intake = _intake(runtime, database, _config(net, REQUESTER))
    reply = await _reply_from_provider(net)
    await intake.handle(reply)
    assert await _claim_status(database, reply) == HELD
    workers.cancel()
    with pytest.raises(asyncio.CancelledError):
        await workers
    await intake.aclose()
    await close(gateway)
    await intake.client.aclose()
    return reply


async def test_a_reply_before_its_send_is_recorded_is_held_then_delivered(
    network: SandboxNetwork, migrated_url: str
) -> None:
    database = Database(migrated_url)
    runtime, gateway, release, workers = await _posted_then_blocked(network, database, "a")
    intake = _intake(runtime, database, _config(network, REQUESTER))
    try:
        reply = await _reply_from_provider(network)
        await intake.handle(reply)
        # Held: not failed "Unable to correlate", however long the send stays unresolved.
        assert await _claim_status(database, reply) == HELD
        assert await _audited(database, "task.held") == 1
        await asyncio.sleep(0.3)
        assert _on_server(network, reply["id"])["status"] == "in-progress"
        assert await _instance_status(database, "bk-held") == "running"

        release.set()  # the send is recorded: the held reply goes to the waiting instance
        await workers

        async def taken_in() -> bool:
            return await _claim_status(database, reply) == TAKEN_IN

        await _until(taken_in)
        await runtime.run_until_idle()
        assert await _instance_status(database, "bk-held") == "completed"
        assert _on_server(network, reply["id"])["status"] == "completed"
    finally:
        release.set()
        await close(gateway)
        await intake.client.aclose()
        await database.dispose()


async def test_a_held_reply_survives_a_restart_and_reaches_its_instance(
    network: SandboxNetwork, migrated_url: str
) -> None:
    """The bridge dies after the provider accepted the request and before the send was
    recorded; the provider's answer arrives meanwhile. After the restart the dead process's
    lease runs out, the send is found delivered and recorded, and the held reply correlates:
    no lost result, no second request."""
    database = Database(migrated_url)
    reply = await _held_then_stopped(network, database, "doomed")

    restarted, gateway = await runtime_for(
        database, _config(network, REQUESTER), owner="restarted", settings=SHORT_LEASE
    )
    intake = _intake(restarted, database, _config(network, REQUESTER))
    try:
        assert await intake.recover() == 1
        assert await _claim_status(database, reply) == HELD  # its send is still unresolved

        async def completed() -> bool:
            await restarted.run_until_idle()
            return await _instance_status(database, "bk-held") == "completed"

        await _until(completed, seconds=30)
        assert await _claim_status(database, reply) == TAKEN_IN
        requests = [
            task
            for task in network.servers[PROVIDER].service.store.all("Task")
            if input_values(task, "message-name") == ["request"]
        ]
        assert len(requests) == 1
    finally:
        await close(gateway)
        await intake.client.aclose()
        await database.dispose()


async def test_a_reply_held_by_a_replica_that_stopped_is_delivered_by_the_sweep(
    network: SandboxNetwork, migrated_url: str
) -> None:
    """Listeners are per process: when the replica that held a reply stops and another one
    resolves the send, the other one's periodic sweep finds the held claim in the store and
    delivers it (a claim another replica finished is never overwritten)."""
    database = Database(migrated_url)
    reply = await _held_then_stopped(network, database, "stopped")

    other, gateway = await runtime_for(
        database, _config(network, REQUESTER), owner="other", settings=SHORT_LEASE
    )
    intake = _intake(other, database, _config(network, REQUESTER))
    try:
        # The other replica's intake never saw the reply: only the store knows it is held.
        async def send_recorded() -> bool:
            await other.run_until_idle()
            return not await other.sends_in_flight("bk-held")

        await _until(send_recorded, seconds=30)
        assert await _claim_status(database, reply) == HELD
        # A losing replica's late "claimed elsewhere" does not overwrite the held claim.
        async with database.transaction() as session:
            assert not await repo.set_task_seen_status(
                session,
                reply["id"],
                reply["meta"]["versionId"],
                TaskSeenStatus.CLAIMED_ELSEWHERE,
                only_from=(TaskSeenStatus.CLAIMING,),
            )
        assert await intake.sweep_held() == 1

        async def completed() -> bool:
            await other.run_until_idle()
            return await _instance_status(database, "bk-held") == "completed"

        await _until(completed, seconds=30)
        assert await _claim_status(database, reply) == TAKEN_IN
        assert await _audited(database, "task.held") == 1
    finally:
        await intake.aclose()
        await close(gateway)
        await intake.client.aclose()
        await database.dispose()
