"""A providing site's heartbeats while the bridge runs: the queue and durations from the real
store (SQLite and PostgreSQL), a registry that is down and comes back, a model server that is
not there."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx
import pytest
from sqlalchemy import update

from dsf_bridge.config import OmiSettings
from dsf_bridge.omi.registry import FhirRegistryClient
from dsf_bridge.plugins.inference import EXECUTION_PROCESS
from dsf_bridge.runtime.publishing import ServicePublication, service_offers
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.queries import process_load
from dsf_bridge.store.tables import ProcessInstance
from tests.omi.fhir_registry import FhirRegistry
from tests.served import free_port

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


async def _instances(
    database: Database, key: str, statuses: list[tuple[str, float | None]]
) -> None:
    """Instances of ``key`` with a status and, for ended ones, how many seconds they took."""
    async with database.transaction() as session:
        definition = await repo.deploy_definition(
            session, process_key=key, version="1.0", plugin="p", model_hash="a" * 64
        )
    for index, (status, seconds) in enumerate(statuses):
        instance_id = f"{key[-4:]}-{index}"
        async with database.transaction() as session:
            await repo.create_instance(
                session,
                instance_id=instance_id,
                definition_id=definition,
                business_key=f"bk-{instance_id}",
                status=status,
                state={"v": 1, "tokens": []},
                now=T0,
            )
            if seconds is not None:
                await session.execute(
                    update(ProcessInstance)
                    .where(ProcessInstance.id == instance_id)
                    .values(
                        ended_at=T0 + dt.timedelta(seconds=seconds + index),
                        created_at=T0 + dt.timedelta(seconds=index),
                    )
                )


async def test_process_load_counts_running_and_measures_completed(database: Database) -> None:
    await _instances(
        database,
        EXECUTION_PROCESS,
        [
            ("running", None),
            ("running", None),
            ("completed", 4.0),
            ("completed", 6.0),
            ("failed", 100.0),
        ],
    )
    await _instances(database, "dsfdev_ping", [("running", None), ("completed", 50.0)])
    async with database.transaction() as session:
        load = await process_load(session, EXECUTION_PROCESS, recent=20)
        latest = await process_load(session, EXECUTION_PROCESS, recent=1)
    assert load.running == 2
    assert sorted(load.recent_durations) == [4.0, 6.0]  # failed and other processes left out
    assert latest.recent_durations == (6.0,)  # the newest


async def test_heartbeats_survive_a_registry_that_is_down(sqlite_database: Database) -> None:
    await _instances(sqlite_database, EXECUTION_PROCESS, [("running", None), ("completed", 10.0)])
    registry = FhirRegistry()
    registry.up = False
    settings = OmiSettings.model_validate(
        {
            "registry_url": "http://registry.test/fhir",
            "publish": True,
            # Nothing listens there: the model server is down.
            "catalogue": [{"id": "tc", "inference_url": f"http://127.0.0.1:{free_port()}"}],
        }
    )
    client = FhirRegistryClient(
        "http://registry.test/fhir", transport=httpx.ASGITransport(app=registry.app)
    )
    publication = ServicePublication(
        client, "provider.test", service_offers(settings), sqlite_database, interval=0.05
    )
    stop = asyncio.Event()
    loop = asyncio.ensure_future(publication.run(stop))
    try:
        await asyncio.sleep(0.3)
        assert not loop.done()  # a registry that is down never stops the loop
        assert publication.beats == 0
        assert registry.requests  # it kept trying
        registry.up = True
        for _ in range(100):
            if publication.beats >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)
        await client.aclose()
    assert publication.beats >= 2
    [service] = registry.all("HealthcareService")
    [beat] = [e for e in service["extension"] if e["url"].endswith("/heartbeat")]
    parts = {part["url"]: part for part in beat["extension"]}
    assert parts["status"]["valueCode"] == "unavailable"
    assert parts["queueLength"]["valueInteger"] == 1
    assert parts["estimatedWaitingTime"]["valueDuration"]["value"] == pytest.approx(10.0)
    assert len(registry.all("Device")) == 1  # published once, not per beat
