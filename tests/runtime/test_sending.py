"""Sending Tasks to another site over the sandbox network: retries and crashes."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.tasks import input_values, parse_instantiates_canonical
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.runtime.gateway import DsfTaskGateway
from dsf_bridge.runtime.ports import OutgoingTask
from dsf_bridge.sandbox.network import SandboxNetwork
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import TaskSeenStatus
from dsf_bridge.telemetry import REGISTRY
from tests.forward_proxy import ForwardProxyServer, ProxiedRequest
from tests.runtime.sending import (
    FAST,
    KEY,
    PROVIDER_DEFINITION,
    SHORT_LEASE,
    close,
    runtime_for,
    site_client,
    site_config,
)
from tests.sandbox.harness import task_profile

# The process request_reply.bpmn's send instantiates (http://test.org/bpe/Process/provide|1.0).
KEY_SENT = "testorg_provide"

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUESTER = "Site_A"
PROVIDER = "Site_B"
REQUEST_PROFILE = "http://test.org/fhir/StructureDefinition/task-request|1.0"


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[SandboxNetwork]:
    async with SandboxNetwork(tmp_path / "net", [REQUESTER, PROVIDER]) as net:
        client, _ = site_client(_config(net, PROVIDER))
        async with client:
            await client.create(PROVIDER_DEFINITION)
            await client.create(task_profile(REQUEST_PROFILE))
        yield net


def _config(net: SandboxNetwork, organization: str) -> dict[str, str]:
    return site_config(net, organization, PROVIDER)


def _requests_at_provider(net: SandboxNetwork) -> list[dict[str, Any]]:
    return [
        task
        for task in net.servers[PROVIDER].service.store.all("Task")
        if input_values(task, "message-name") == ["request"]
    ]


async def test_503_twice_then_201_delivers_one_task(
    network: SandboxNetwork, database: Database
) -> None:
    network.servers[PROVIDER].service.inject_failures("POST", "Task", [503, 503])
    runtime, gateway = await runtime_for(database, _config(network, REQUESTER), owner="a")
    sends = "dsf_bridge_send_duration_seconds_count"
    sent_before = {
        outcome: REGISTRY.get_sample_value(sends, {"process": KEY_SENT, "outcome": outcome}) or 0
        for outcome in ("ok", "error")
    }
    try:
        instance_id = await runtime.start(
            KEY,
            message_name="start",
            business_key="bk-503",
            variables={"target": {"organizationIdentifier": PROVIDER}},
        )
        await runtime.run_until_idle()
    finally:
        await close(gateway)
    (arrived,) = _requests_at_provider(network)
    assert input_values(arrived, "business-key") == ["bk-503"]
    assert arrived["requester"]["identifier"]["value"] == REQUESTER
    async with database.transaction() as session:
        record = await repo.load_instance(session, instance_id)
        sent = await repo.tasks_of_instance(session, instance_id, "outgoing")
    assert record is not None
    assert record.status == "running"  # now waiting for the reply
    assert len(sent) == 1
    assert arrived["id"] in sent[0]
    # One send measured, by the key of the process it instantiates, its client retries inside.
    assert parse_instantiates_canonical(arrived["instantiatesCanonical"]).key == KEY_SENT
    sent_after = {
        outcome: REGISTRY.get_sample_value(sends, {"process": KEY_SENT, "outcome": outcome}) or 0
        for outcome in ("ok", "error")
    }
    assert sent_after == {"ok": sent_before["ok"] + 1, "error": sent_before["error"]}


async def test_tasks_to_a_remote_site_go_through_the_proxy(
    network: SandboxNetwork, sqlite_database: Database
) -> None:
    def authority(organization: str) -> str:
        return network.base_url(organization).split("://", 1)[1].split("/", 1)[0]

    async with ForwardProxyServer() as proxy:
        # The local FHIR server is reached directly (no_proxy), the remote one through the proxy.
        forward = ForwardProxy(proxy.url, no_proxy=(authority(REQUESTER),))
        runtime, gateway = await runtime_for(
            sqlite_database, _config(network, REQUESTER), owner="a", proxy=forward
        )
        try:
            await runtime.start(
                KEY,
                message_name="start",
                business_key="bk-proxy",
                variables={"target": {"organizationIdentifier": PROVIDER}},
            )
            await runtime.run_until_idle()
        finally:
            await close(gateway)
    (arrived,) = _requests_at_provider(network)
    assert input_values(arrived, "business-key") == ["bk-proxy"]
    assert proxy.seen
    assert set(proxy.seen) == {ProxiedRequest("CONNECT", authority(PROVIDER), None)}


async def _killed_bridge(db_url: str, config: dict[str, str], *mode: str) -> None:
    """Run tests.runtime.sending as its own process until it SIGKILLs itself (see there)."""
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.runtime.sending",
        db_url,
        json.dumps(config),
        *mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    _out, err = await doomed.communicate()
    assert doomed.returncode == -signal.SIGKILL, err.decode()[-2000:]


@pytest.mark.parametrize("migrated_url", ["sqlite"], indirect=True)
async def test_killed_between_commit_and_send_delivers_once_after_restart(
    network: SandboxNetwork, migrated_url: str
) -> None:
    config = _config(network, REQUESTER)
    await _killed_bridge(migrated_url, config)
    assert _requests_at_provider(network) == []

    database = Database(migrated_url)
    runtime, gateway = await runtime_for(database, config, owner="restarted")
    try:
        await runtime.run_until_idle()
        await runtime.run_until_idle()
    finally:
        await close(gateway)
        await database.dispose()
    (arrived,) = _requests_at_provider(network)
    assert input_values(arrived, "business-key") == ["bk-kill"]


@pytest.mark.parametrize("migrated_url", ["sqlite"], indirect=True)
async def test_killed_after_the_target_accepted_the_task_sends_no_second_one(
    network: SandboxNetwork, migrated_url: str
) -> None:
    config = _config(network, REQUESTER)
    await _killed_bridge(migrated_url, config, "after-send")
    (posted,) = _requests_at_provider(network)  # delivered, but never recorded as sent
    await asyncio.sleep(SHORT_LEASE.lease.total_seconds() + 0.2)  # the dead lease runs out

    database = Database(migrated_url)
    runtime, gateway = await runtime_for(database, config, owner="restarted")
    try:
        await runtime.run_until_idle()
        async with database.transaction() as session:
            (sent,) = await repo.tasks_with_status(session, "outgoing", TaskSeenStatus.REQUESTED)
            assert sent.instance_id is not None
            record = await repo.load_instance(session, sent.instance_id)
    finally:
        await close(gateway)
        await database.dispose()
    assert [task["id"] for task in _requests_at_provider(network)] == [posted["id"]]
    assert sent.task_id == posted["id"]  # recorded under the Task the first attempt created
    assert record is not None
    assert record.status == "running"  # the send counts as done: it waits for the reply


async def test_a_repeated_send_finds_its_task_and_a_failed_search_posts_again(
    network: SandboxNetwork,
) -> None:
    config = _config(network, REQUESTER)
    client, context = site_client(config)
    gateway = DsfTaskGateway(client, context, REQUESTER, retry=FAST)
    authored = dt.datetime(2026, 11, 23, 9, 30, 15, 123456, tzinfo=dt.UTC)
    send = OutgoingTask(
        instance_id="i-1",
        business_key="bk-repeat",
        instantiates_canonical="http://test.org/bpe/Process/provide|1.0",
        message_name="request",
        profile=REQUEST_PROFILE,
        correlation_key=None,
        target={"organizationIdentifier": PROVIDER},
        authored_on=authored,
    )
    try:
        first = await gateway.send_task(send)
        again = await gateway.send_task(dataclasses.replace(send, maybe_delivered=True))
        other = await gateway.send_task(
            dataclasses.replace(send, business_key="bk-other", maybe_delivered=True)
        )
        later = await gateway.send_task(  # the same send but one millisecond later: another
            dataclasses.replace(
                send, authored_on=authored + dt.timedelta(milliseconds=1), maybe_delivered=True
            )
        )
        network.servers[PROVIDER].service.inject_failures("GET", "Task", [500] * 5)
        blind = await gateway.send_task(
            dataclasses.replace(send, business_key="bk-blind", maybe_delivered=True)
        )
    finally:
        await close(gateway)
    assert again == first  # found, not posted again
    assert other != first  # another business key is another Task
    assert later not in (first, other)
    keys = sorted(input_values(task, "business-key")[0] for task in _requests_at_provider(network))
    assert keys == ["bk-blind", "bk-other", "bk-repeat", "bk-repeat"]
    assert blind not in (first, other)
