"""The web page beside real bridges: Task statuses read from a real DSF-compatible FHIR server
(the sandbox, over mutual TLS) and the ping model drawn with the instance's marks, in Chromium
too (screenshots under ``test-artifacts/screenshots``)."""

from __future__ import annotations

import re
from functools import partial

import httpx
import pytest
from playwright.async_api import Browser, expect
from pydantic import SecretStr

from dsf_bridge.api import ApiServer, create_app
from dsf_bridge.api.diagram import DiagramLibrary
from dsf_bridge.api.fhir import TaskReader
from dsf_bridge.config import ApiSettings
from dsf_bridge.dsf.vocabulary import ENDPOINT_IDENTIFIER_SYSTEM
from dsf_bridge.plugins.pingpong import plugin as pingpong_plugin
from dsf_bridge.store import Database
from tests.api.test_browser import _screenshot, browser
from tests.plugins.test_pingpong import (
    PING,
    Network,
    _finished,
    _settled,
    _start_ping_task,
    network,
)

__all__ = ["browser", "network"]

TOKEN = "server-status-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("network", [("sqlite", "2.1")], indirect=True, ids=["sqlite-dsf2.1"])
async def test_the_task_list_shows_the_fhir_servers_status_and_the_ping_diagram(
    network: Network, browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    search = f"Endpoint?identifier={ENDPOINT_IDENTIFIER_SYSTEM}|Site_B_Endpoint"
    async with network.client("Site_A") as client:
        created = await client.create(
            _start_ping_task({"system": PING, "code": "target-endpoints", "value": search})
        )
        assert created.id is not None
        await _finished(client, created.id, 30)
        await _settled(network)
        reader = TaskReader(partial(client.read, "Task"))
        database = Database(network.db_urls["Site_A"], read_only=True)
        try:
            app = create_app(
                database,
                ApiSettings(token=SecretStr(TOKEN)),
                site="Site_A",
                diagrams=DiagramLibrary([pingpong_plugin]),
                task_reader=reader,
            )
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
                listing = (await http.get("/ui/tasks?role=incoming", headers=AUTH)).text
                task = (await http.get(f"/api/v1/tasks/{created.id}", headers=AUTH)).json()
                instance_id = task["instances"][0]
                page = (await http.get(f"/ui/instances/{instance_id}", headers=AUTH)).text
            # The same pages in Chromium, kept as screenshots: the shipped ping model drawn.
            async with ApiServer(app) as server:
                chromium = await browser.new_context(
                    base_url=server.url, http_credentials={"username": "a", "password": TOKEN}
                )
                tab = await chromium.new_page()
                await tab.set_viewport_size({"width": 1400, "height": 900})
                await tab.goto(f"/ui/instances/{instance_id}")
                await expect(
                    tab.locator('svg#diagram g[data-element="PingEachTarget"]')
                ).to_have_class("element subProcess completed")
                shot = await _screenshot(tab, "instance-ping")
                await tab.goto("/ui/tasks")
                await expect(tab.locator("#task-list")).to_contain_text("on the FHIR server")
                tasks_shot = await _screenshot(tab, "tasks-from-the-fhir-server")
                await chromium.close()
            with capsys.disabled():
                print(f"\nscreenshots: {shot} {tasks_shot}")
        finally:
            await database.dispose()
    start_row = listing.split(f"Task/{created.id}", 1)[1].split("</tr>")[0]
    assert '<span class="status completed">completed</span>' in start_row
    assert "on the FHIR server" in start_row
    assert "organization:Site_A" in start_row
    assert "startPing" in start_row
    # The pong that came back from Site_B, read on Site_A's server.
    assert "organization:Site_B" in listing
    assert task["server"] == {
        "status": "completed",
        "requester": "organization:Site_A",
        "message_name": "startPing",
        "failure": None,
        "unavailable": None,
    }
    assert 'id="diagram"' in page
    assert 'data-element="SelectTargets"' in page
    assert 'class="element serviceTask completed" data-element="SelectTargets"' in page
    for passed in ("TargetDone", "TargetEnd", "End"):  # no audit event names these
        assert re.search(rf'class="element \w+ completed" data-element="{passed}"', page), passed
    # The instance has ended: nothing stands anywhere.
    assert not re.search(r'class="element [^"]* (active|incident)"', page)
