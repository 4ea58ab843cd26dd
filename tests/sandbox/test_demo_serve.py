"""``dsf-bridge demo --serve``: both sites' stores in the admin web page after the run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from dsf_bridge.sandbox.demo import serve_audit
from dsf_bridge.store import Database, upgrade
from tests.api.seed import seed

TOKEN = "demo-serve-token-012345"


async def test_each_site_gets_its_page(tmp_path: Path) -> None:
    urls: dict[str, str] = {}
    for site in ("Hospital_A", "AI_Provider"):
        url = f"sqlite:///{tmp_path / site}.db"
        upgrade(url)
        database = Database(url)
        await seed(database, business_key_prefix=site)
        await database.dispose()
        urls[site] = url
    stop, started = asyncio.Event(), asyncio.Event()
    said: list[str] = []
    serving = asyncio.create_task(
        serve_audit(urls, stop, said.append, token=TOKEN, started=started)
    )
    await asyncio.wait_for(started.wait(), 10)
    pages: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(auth=("admin", TOKEN)) as http:
        for line in said:
            site, _, rest = line.partition(": audit web page at ")
            if rest:
                pages[site] = await http.get(rest)
    stop.set()
    served = await serving
    assert set(served) == set(pages) == {"Hospital_A", "AI_Provider"}
    for site, page in pages.items():
        assert page.status_code == 200
        assert f"Instances · {site}" in page.text
        assert f"{site}-wait" in page.text  # this site's instances, not the other's
    assert any(TOKEN in line for line in said)
