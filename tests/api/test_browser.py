"""The web page in a real browser: Debian's Chromium driven by Playwright, against the admin API
served by uvicorn on a loopback socket over a store the real runtime filled.

Chromium comes from Debian (``apt-get install chromium``), never from a download: the test fails
with that command when it is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
from pydantic import SecretStr

from dsf_bridge.api import ApiServer, create_app
from dsf_bridge.config import ApiSettings
from dsf_bridge.store import Database
from tests.api.seed import Seeded, seed

TOKEN = "browser-test-token-0123"
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
