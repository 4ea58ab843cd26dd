"""Kill the bridges anywhere (issue 10's proof): two sites' bridges run as real processes
(``dsf-bridge run``) while OMI requests go between them, and are killed with SIGKILL at random
moments and restarted. Afterwards every start Task has ended with a result or a reason, and on
the wire there is exactly one request and one result per start Task, and one result Bundle.

The sandbox DSF FHIR servers run in this process (they outlive every kill and are what the
assertions read); Orthanc and MLServer are the session's real components. The default run is
two seeds, one on SQLite and the other on PostgreSQL (each store still sees a whole kill
schedule with every assertion; each run costs most of a minute, mostly bridges starting again);
``pytest --long`` runs more requests, kills and seeds, each seed on both stores.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from dsf_bridge.dsf.tasks import input_values
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.plugins.inference import RESULT_BUNDLE_IDENTIFIER_SYSTEM
from dsf_bridge.sandbox.components import MLServerProcess, OrthancProcess
from dsf_bridge.sandbox.demo import InferenceNetwork, audit_events, plugin_resources
from dsf_bridge.store import Database, upgrade
from dsf_bridge.store.tables import ProcessInstance
from tests.components import REFERENCE_MODEL
from tests.omi.data import load_ct_small, make_series

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
SERVICE = "tissue-composition"
# Short leases and waits, so that a killed bridge's work is taken over within seconds.
RUNTIME_ENV = {
    "DSF_BRIDGE_RUNTIME__LEASE": "3",
    "DSF_BRIDGE_RUNTIME__IDLE_POLL": "0.2",
    "DSF_BRIDGE_RUNTIME__JOB_RETRY_DELAY": "0.5",
    "DSF_BRIDGE_RUNTIME__OUTBOX_RETRY_DELAYS": "[0.5, 1, 2, 4, 8, 15]",
    "DSF_BRIDGE_RUNTIME__SHUTDOWN_GRACE": "2",
    "DSF_BRIDGE_LOG__LEVEL": "info",
    "DSF_BRIDGE_LOG__FORMAT": "json",
}


# What a bridge logs while it starts (and idles after binding): a kill after one of these hit
# no work in flight.
_START_UP = frozenset(
    {
        "(nothing logged: starting)",
        "certificate.loaded",
        "server.version",
        "organization.found",
        "resources.published",
        "plugin.deployed",
        "intake.recovered",
        "bridge.started",
        "subscription.bound",
        "subscription.caught_up",
    }
)


@dataclass(frozen=True)
class Plan:
    """One run: how many start Tasks, how many kills, the seed of the kill schedule and the
    kind of store both bridges keep their state in."""

    requests: int
    kills: int
    seed: int
    store: str


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "plan" in metafunc.fixturenames:
        if metafunc.config.getoption("--long"):
            plans = [
                Plan(requests=40, kills=30, seed=seed, store=store)
                for seed in (101, 102, 103, 104, 105)
                for store in ("sqlite", "postgresql")
            ]
        else:
            plans = [
                Plan(requests=8, kills=6, seed=11, store="sqlite"),
                Plan(requests=8, kills=6, seed=12, store="postgresql"),
            ]
        metafunc.parametrize("plan", plans, ids=lambda p: f"seed{p.seed}-{p.store}")


@dataclass
class BridgeProcess:
    """``dsf-bridge run`` for one site, started again after every kill; each run logs to its
    own file."""

    organization: str
    config: Path
    environment: Mapping[str, str]
    logs: Path
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    # The last logged event of each killed run: where the kill fell.
    killed_after: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.organization}-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dsf_bridge", "--config", str(self.config), "run"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, **self.environment},
            )

    def kill(self) -> bool:
        """SIGKILL; False if the run had already ended by itself."""
        assert self.process is not None
        alive = self.process.poll() is None
        if alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.killed_after.append(_last_event(self.log_path))
        return alive

    def stop(self) -> int:
        """SIGTERM and wait: the exit status of a graceful stop."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return -9

    def wait_bound(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if "subscription.bound" in self.log_path.read_text(errors="replace"):
                return
            assert self.process is not None
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        pytest.fail(f"bridge of {self.organization} did not bind its subscription:\n{tail}")


def _wait_bound(bridges: Iterable[BridgeProcess]) -> None:
    for bridge in bridges:
        bridge.wait_bound(60)


def _last_event(path: Path) -> str:
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return str(json.loads(line).get("event"))
    return "(nothing logged: starting)"


@dataclass(frozen=True)
class Studies:
    dicomweb_url: str
    # (Study Instance UID, Series Instance UID or None for the whole study)
    uids: list[tuple[str, str | None]]


@pytest.fixture
async def studies(orthanc: OrthancProcess) -> Studies:
    """CT_small.dcm and a five-slice series, stored in the session's Orthanc."""
    ct_small = load_ct_small()
    series: list[Dataset] = make_series(ct_small)
    archive = DicomWebArchive(orthanc.dicomweb_url)
    try:
        await archive.store([ct_small, *series])
    finally:
        archive.close()
    return Studies(
        orthanc.dicomweb_url,
        [
            (str(ct_small.StudyInstanceUID), None),
            (str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID)),
        ],
    )


@pytest.fixture
def store_urls(
    plan: Plan, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """One empty, migrated store per site, of the plan's kind."""
    organizations = (REQUESTER, PROVIDER)
    if plan.store == "sqlite":
        urls = {o: f"sqlite:///{tmp_path / f'{o}.db'}" for o in organizations}
        for url in urls.values():
            upgrade(url)
        yield urls
        return
    admin_url: str = request.getfixturevalue("postgres_server")
    admin = make_url(admin_url).set(drivername="postgresql").render_as_string(False)
    names = {o: f"dsfb_crash_{uuid.uuid4().hex[:12]}" for o in organizations}
    with psycopg.connect(admin, autocommit=True) as connection:
        for name in names.values():
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        urls = {
            o: make_url(admin_url).set(database=name).render_as_string(False)
            for o, name in names.items()
        }
        for url in urls.values():
            upgrade(url)
        yield urls
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            for name in names.values():
                connection.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[InferenceNetwork]:
    """Both sites' sandbox DSF FHIR servers, in this process; no bridge yet."""
    async with InferenceNetwork(
        tmp_path / "sites",
        bridges={},
        published={o: plugin_resources(o) for o in (REQUESTER, PROVIDER)},
    ) as network:
        yield network


@pytest.fixture
def bridges(
    network: InferenceNetwork,
    store_urls: Mapping[str, str],
    mlserver: MLServerProcess,
    tmp_path: Path,
) -> dict[str, BridgeProcess]:
    """Both sites' bridges, not started yet."""
    logs = tmp_path / "logs"
    catalogues = {
        REQUESTER: [{"id": SERVICE, "organization": PROVIDER}],
        PROVIDER: [
            {"id": SERVICE, "model_name": REFERENCE_MODEL.name, "inference_url": mlserver.base_url}
        ],
    }
    logs.mkdir()
    return {
        organization: BridgeProcess(
            organization,
            network.sites[organization].bridge_config,
            {
                **RUNTIME_ENV,
                "DSF_BRIDGE_DB__URL": store_urls[organization],
                "DSF_BRIDGE_OMI__CATALOGUE": json.dumps(catalogue),
                # Studies go through DSF, pseudonymized: the kills hit that way too.
                "DSF_BRIDGE_PSEUDONYMIZATION__SECRET": f"crash-test-secret-of-{organization}-0123",
            },
            logs,
        )
        for organization, catalogue in catalogues.items()
    }


async def _running_instances(db_url: str) -> int:
    database = Database(db_url)
    try:
        async with database.transaction() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(ProcessInstance)
                .where(ProcessInstance.status == "running")
            )
    finally:
        await database.dispose()
    return int(count or 0)


def _open_tasks(network: InferenceNetwork) -> list[str]:
    return [
        f"{organization}/Task/{t['id']}"
        for organization in (REQUESTER, PROVIDER)
        for t in network.tasks(organization)
        if t["status"] in ("requested", "in-progress")
    ]


def _business_keys(tasks: list[dict[str, Any]], message_name: str) -> collections.Counter[str]:
    return collections.Counter(
        str(input_values(t, "business-key")[0])
        for t in tasks
        if input_values(t, "message-name") == [message_name]
    )


def _outputs(task: Mapping[str, Any], code: str) -> list[Any]:
    return [
        next(v for k, v in o.items() if k.startswith("value"))
        for o in task.get("output") or []
        if o["type"]["coding"][0]["code"] == code
    ]


async def test_killed_anywhere_every_request_ends_once(
    plan: Plan,
    store_urls: dict[str, str],
    network: InferenceNetwork,
    bridges: dict[str, BridgeProcess],
    studies: Studies,
) -> None:
    rng = random.Random(plan.seed)  # noqa: S311 - a reproducible kill schedule, not a secret
    for bridge in bridges.values():
        bridge.start()
    await asyncio.to_thread(_wait_bound, bridges.values())

    async def request() -> str:
        study, series = rng.choice(studies.uids)
        inputs: dict[str, Any] = {"series_instance_uid": series} if series else {}
        return await network.request(
            REQUESTER,
            study_instance_uid=study,
            dicomweb_endpoint=studies.dicomweb_url,
            service=SERVICE,
            result_timeout="PT5M",
            **inputs,
        )

    # A few requests at once, the rest one or two before each kill, so that every kill falls
    # among requests in flight; most kills wait for the restarted bridge to be up, some hit
    # its start-up (recovery, publication) instead.
    started = [await request() for _ in range(max(1, plan.requests // 4))]
    later = plan.requests - len(started)
    kills = 0
    began = time.monotonic()
    try:
        for number in range(plan.kills):
            for _ in range(min(later, rng.choice((1, 2)))):
                started.append(await request())
                later -= 1
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            victim = bridges[rng.choice(sorted(bridges))]
            kills += victim.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            victim.start()
            if number < plan.kills - 1 and rng.random() < 0.75:
                await asyncio.to_thread(victim.wait_bound, 60)
        for _ in range(later):
            started.append(await request())
        finished = await network.finished(REQUESTER, started, 240)
        # Up again before the graceful stop: a SIGTERM during start-up is not one.
        await asyncio.to_thread(_wait_bound, bridges.values())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (  # noqa: ASYNC110 - no event for either
            _open_tasks(network) or any([await _running_instances(u) for u in store_urls.values()])
        ):
            await asyncio.sleep(0.2)
    finally:
        statuses = {o: b.stop() for o, b in bridges.items()}
    elapsed = time.monotonic() - began

    outcomes = collections.Counter(task["status"] for task in finished.values())
    summary = {
        "seed": plan.seed,
        "store": make_url(store_urls[REQUESTER]).get_backend_name(),
        "requests": len(started),
        "kills": kills,
        "killed_after": {o: b.killed_after for o, b in bridges.items()},
        "outcomes": dict(outcomes),
        "seconds": round(elapsed, 1),
    }
    print("crash-test " + json.dumps(summary))

    assert kills == plan.kills, summary  # every kill hit a live bridge: none died by itself
    # Kills fell among the work, not only into start-ups (where they prove little).
    at_work = [
        event
        for events in summary["killed_after"].values()  # type: ignore[attr-defined]
        for event in events
        if event not in _START_UP
    ]
    # At least one in a short run (a few kills may all fall into start-ups by chance), a
    # third in a long one (about two thirds do).
    assert len(at_work) >= (plan.kills // 3 if plan.kills > 10 else 1), summary
    assert statuses == {REQUESTER: 0, PROVIDER: 0}, f"a graceful stop exits 0: {statuses}"
    # Every start Task ended: with a result, or failed with a reason a human can read.
    for task in finished.values():
        if task["status"] == "failed":
            assert _outputs(task, "error"), task
    assert outcomes["completed"] == len(started), summary
    # No Task left open on either server, no instance left running in either store.
    assert _open_tasks(network) == []
    for organization in (REQUESTER, PROVIDER):
        assert await _running_instances(store_urls[organization]) == 0, organization
    # On the wire: one request per start Task at the provider, one result back per request.
    requests = _business_keys(network.tasks(PROVIDER), "inferenceRequest")
    results = _business_keys(network.tasks(REQUESTER), "inferenceResult")
    assert len(requests) == len(started), requests
    assert set(requests.values()) == {1}, requests
    assert results == requests
    # One result Bundle per completed request, and the start Task names it.
    bundles = [
        b
        for b in network.resources(REQUESTER, "Bundle")
        if (b.get("identifier") or {}).get("system") == RESULT_BUNDLE_IDENTIFIER_SYSTEM
    ]
    assert len(bundles) == outcomes["completed"]
    named = {
        str(reference["reference"]).split("/")[1]
        for task in finished.values()
        for reference in _outputs(task, "inference-result")
    }
    assert named == {b["id"] for b in bundles}
    # Both audit chains verify.
    for url in store_urls.values():
        assert await audit_events(url) > 0
