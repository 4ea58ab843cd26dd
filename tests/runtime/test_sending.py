"""Sending Tasks to another site over the sandbox network: retries and crashes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.tasks import input_values
from dsf_bridge.sandbox.network import SandboxNetwork
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from tests.runtime.sending import KEY, PROVIDER_DEFINITION, close, runtime_for, site_client

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUESTER = "Site_A"
PROVIDER = "Site_B"


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[SandboxNetwork]:
    async with SandboxNetwork(tmp_path / "net", [REQUESTER, PROVIDER]) as net:
        client, _ = site_client(_config(net, PROVIDER))
        async with client:
            await client.create(PROVIDER_DEFINITION)
        yield net


def _config(net: SandboxNetwork, organization: str) -> dict[str, str]:
    site = net.sites[organization]
    return {
        "organization": organization,
        "base_url": net.base_url(organization),
        "certificate": str(site.client_certificate),
        "key": str(site.client_key),
        "ca": str(site.ca),
        "target": PROVIDER,
    }


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


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_killed_between_commit_and_send_delivers_once_after_restart(
    network: SandboxNetwork, migrated_url: str
) -> None:
    config = _config(network, REQUESTER)
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.runtime.sending",
        migrated_url,
        json.dumps(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    _out, err = await doomed.communicate()
    assert doomed.returncode == -signal.SIGKILL, err.decode()[-2000:]
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
