"""The web page in a real browser: Debian's Chromium driven by Playwright, against the admin API
served by uvicorn on a loopback socket over a store the real runtime filled. Screenshots of the
pages go to ``test-artifacts/screenshots/`` (or ``$DSF_BRIDGE_SCREENSHOTS/screenshots``); the
test prints their paths.

Chromium comes from Debian (``apt-get install chromium``), never from a download: the test fails
with that command when it is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
from pydantic import SecretStr
from sqlalchemy import select

from dsf_bridge.api import ApiServer, create_app
from dsf_bridge.api.diagram import DiagramLibrary
from dsf_bridge.config import ApiSettings
from dsf_bridge.store import Database
from dsf_bridge.store.tables import AuditEvent
from tests.api.seed import Seeded, seed
from tests.runtime.test_incidents import KEY as INCIDENT_KEY
from tests.runtime.test_incidents import _runtime as incident_runtime
from tests.runtime.test_incidents import _until_incident as until_incident
from tests.runtime.test_processes import Clock as IncidentClock
from tests.runtime.test_processes import FakeGateway

TOKEN = "browser-test-token-0123"
REQUEST_REPLY = Path(__file__).parents[1] / "runtime" / "request_reply.bpmn"
CHROMIUM = os.environ.get("DSF_BRIDGE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it with "
            "'apt-get install chromium' (or set DSF_BRIDGE_CHROMIUM)"
        )
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox"]
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def _page(browser: Browser, url: str, errors: list[str], *, token: str = TOKEN) -> Page:
    context = await browser.new_context(
        base_url=url, http_credentials={"username": "admin", "password": token}
    )
    page = await context.new_page()

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":  # a CSP violation or a missing asset shows up here
            errors.append(message.text)

    page.on("console", console)
    return page


async def test_an_administrator_follows_an_instance_from_the_list_to_its_audit(
    sqlite_database: Database, browser: Browser
) -> None:
    store = sqlite_database
    seeded: Seeded = await seed(store)
    app = create_app(
        store, ApiSettings(token=SecretStr(TOKEN)), clock=seeded.clock, site="Hospital_A"
    )
    errors: list[str] = []
    async with ApiServer(app) as server:
        page = await _page(browser, server.url, errors)
        await page.goto("/")  # redirects to the web page
        await expect(page).to_have_title("Instances · Hospital_A")
        await expect(page.locator("#readiness h2")).to_have_text("Ready")
        await expect(page.locator("#count-running")).to_have_text("1")
        await expect(page.locator("#count-failed")).to_have_text("1")
        await expect(page.locator("#instances tbody tr")).to_have_count(3)
        # The stylesheet loaded under the page's Content-Security-Policy.
        header = page.locator("header")
        background = await header.evaluate("e => getComputedStyle(e).backgroundColor")
        assert background == "rgb(243, 245, 247)"

        await page.select_option("select[name=status]", "running")
        await page.click("form.filters button[type=submit]")
        await expect(page.locator("#instances tbody tr")).to_have_count(1)
        await page.click("#instances tbody tr a")
        await expect(page).to_have_url(f"{server.url}/ui/instances/{seeded.waiting}")
        await expect(page.locator("#status")).to_have_text("running")
        waiting = page.locator("#tokens tbody tr")
        await expect(waiting).to_have_count(1)
        await expect(waiting).to_contain_text("message reply at Reply")
        await expect(waiting).to_contain_text("timer")
        audit_actions = page.locator("#audit tbody tr td:nth-child(3)")
        await expect(audit_actions.first).to_have_text("instance.started")
        await expect(page.locator("#audit")).to_contain_text("task.sent")
        await expect(page.locator("#variables")).to_contain_text("studyUid")

        await page.click("nav >> text=Audit trail")
        await page.click("button[name=verify]")
        await expect(page.locator("#chain")).to_contain_text("Hash chain intact")

        await page.click("nav >> text=Tasks")
        await expect(page.locator("#task-list")).to_contain_text("Task/start-wait")

        assert errors == []
        await page.context.close()

        stranger = await _page(browser, server.url, errors, token="not-the-token-at-all")
        response = await stranger.goto("/ui/")
        assert response is not None
        assert response.status == 401
        await stranger.context.close()


SCREENSHOTS = (
    Path(os.environ.get("DSF_BRIDGE_SCREENSHOTS", Path(__file__).parents[2] / "test-artifacts"))
    / "screenshots"
)


async def _screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def test_an_auditor_reads_the_diagram_follows_tasks_and_pages(
    sqlite_database: Database, browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15: the instance page draws the model with its marks; every Task link lands on the
    Task; the Task list pages; screenshots are kept as test artifacts."""
    store = sqlite_database
    seeded: Seeded = await seed(store)
    diagrams = DiagramLibrary()
    diagrams.add(REQUEST_REPLY, version="1.0")
    app = create_app(
        store,
        ApiSettings(token=SecretStr(TOKEN)),
        clock=seeded.clock,
        site="Hospital_A",
        diagrams=diagrams,
    )
    errors: list[str] = []
    async with ApiServer(app) as server:
        page = await _page(browser, server.url, errors)
        await page.set_viewport_size({"width": 1400, "height": 900})

        await page.goto(f"/ui/instances/{seeded.failed}")
        diagram = page.locator("svg#diagram")
        await expect(diagram).to_be_visible()
        failed = diagram.locator('g[data-element="HandleTimeout"]')
        await expect(failed).to_have_class("element serviceTask failed")
        await expect(diagram.locator('g[data-element="Timeout"]')).to_have_class(
            "element intermediateCatchEvent completed"
        )
        await expect(diagram.locator('g[data-element="StoreResult"]')).to_have_class(
            "element serviceTask"
        )
        # The stylesheet colours the marks (no inline style under the CSP).
        stroke = await failed.locator("rect").evaluate("e => getComputedStyle(e).stroke")
        assert stroke == "rgb(179, 38, 30)"
        box = await diagram.bounding_box()
        assert box is not None
        assert box["width"] > 400
        await _screenshot(page, "instance-failed")

        await page.goto(f"/ui/instances/{seeded.waiting}")
        await expect(page.locator('svg#diagram g[data-element="Wait"]')).to_have_class(
            "element eventBasedGateway active"
        )
        await expect(page.locator('svg#diagram g[data-element="Prepare"]')).to_have_class(
            "element serviceTask completed"
        )
        for waiting_at in ("Reply", "Timeout"):  # what the event-based gateway waits for
            await expect(page.locator(f'svg#diagram g[data-element="{waiting_at}"]')).to_have_class(
                "element intermediateCatchEvent active"
            )
        await _screenshot(page, "instance-waiting")

        await page.goto(f"/ui/instances/{seeded.completed}")
        await expect(page.locator('svg#diagram g[data-element="Done"]')).to_have_class(
            "element endEvent completed"
        )
        await _screenshot(page, "instance-completed")
        # A Task link lands on the Task, which links back to its instance.
        await page.click("#tasks a >> text=Task/start-done")
        await expect(page).to_have_url(f"{server.url}/ui/tasks/start-done")
        await expect(page.locator("#task-facts .server-status")).to_contain_text("completed")
        await expect(page.locator("#audit")).to_contain_text("instance.started")
        await _screenshot(page, "task")
        await page.click(f"#task-instances a >> text={seeded.completed}")
        await expect(page).to_have_url(f"{server.url}/ui/instances/{seeded.completed}")

        # The Task list pages, two at a time, and says what the bridge knows of each Task.
        await page.goto("/ui/tasks?limit=2")
        rows = page.locator("#task-list tbody tr")
        await expect(rows).to_have_count(2)
        first = await rows.locator("td:nth-child(2)").all_inner_texts()
        await _screenshot(page, "tasks")
        await page.click("a[rel=next]")
        await expect(rows).to_have_count(2)
        second = await rows.locator("td:nth-child(2)").all_inner_texts()
        assert not set(first) & set(second)
        await page.goto("/ui/tasks?role=incoming&limit=500")
        late = page.locator("#task-list tbody tr", has_text="Task/start-late")
        await expect(late.locator(".server-status")).to_contain_text("failed")
        await expect(late.locator(".failure")).to_contain_text("no reply within 5 minutes")
        await expect(late.locator(".message")).to_have_text("start")

        await page.click("nav >> text=Processes")
        await expect(page.locator("#processes tbody tr")).to_have_count(1)
        await expect(page.locator("#processes")).to_contain_text("testorg_requestReply")
        await _screenshot(page, "processes")
        await page.click("#processes a >> text=3")
        await expect(page.locator("#instances tbody tr")).to_have_count(3)

        await page.click("nav >> text=Incidents")
        await expect(page.locator(".empty")).to_contain_text("No incident")

        assert errors == []
        await page.context.close()
    with capsys.disabled():  # the artifacts' paths in the test output, captured or not
        print(f"\nscreenshots of the web page in {SCREENSHOTS}:")
        for path in sorted(SCREENSHOTS.glob("*.png")):
            print(f"  {path}")


async def test_an_operator_retries_an_incident_from_the_page(
    sqlite_database: Database, browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator signs in with the operator token and retries an incident with the page's
    form (posted by Chromium under the page's CSP); the reader sees no form."""
    store = sqlite_database
    clock = IncidentClock()
    runtime = await incident_runtime(store, FakeGateway(), clock)
    instance_id = await runtime.start(
        INCIDENT_KEY, message_name="start", business_key="bk-r", variables={"mode": "idle"}
    )
    incidents = await until_incident(runtime, store, clock)
    while not incidents:
        incidents = await until_incident(runtime, store, clock)
    operator = "browser-operator-token-0123"
    app = create_app(
        store,
        ApiSettings(token=SecretStr(TOKEN), operator_token=SecretStr(operator)),
        clock=clock,
        site="Hospital_A",
        operator_database=store,
    )
    errors: list[str] = []
    async with ApiServer(app) as server:
        reader = await _page(browser, server.url, errors)
        await reader.goto("/ui/incidents")
        await expect(reader.locator("#incident-list tbody tr")).to_have_count(1)
        await expect(reader.locator("form.act")).to_have_count(0)
        await reader.context.close()

        page = await _page(browser, server.url, errors, token=operator)
        await page.goto("/ui/incidents")
        row = page.locator("#incident-list tbody tr")
        await expect(row).to_have_count(1)
        await expect(row.locator(".error")).to_contain_text("exclusive gateway 'Choose'")
        shot = await _screenshot(page, "incidents-operator")
        with capsys.disabled():
            print(f"\nscreenshot of the operator's incident page: {shot}")
        await row.locator("input[name=retries]").fill("2")
        await row.locator("button.retry").click()
        await expect(page.locator("#queued")).to_contain_text("api:admin")
        await expect(page.locator("#queued")).to_contain_text(instance_id)
        await page.click("text=Back to the instance")
        await expect(page).to_have_url(f"{server.url}/ui/instances/{instance_id}")
        assert errors == []
        await page.context.close()
    await runtime.run_until_idle()
    async with store.transaction() as session:
        actions = [
            (e.action, e.actor)
            for e in (await session.execute(select(AuditEvent))).scalars()
            if e.action == "incident.retried"
        ]
    assert actions == [("incident.retried", "api:admin")]
