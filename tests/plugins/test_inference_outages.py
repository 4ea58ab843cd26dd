"""Outages in the middle of an OMI inference request between two sandbox sites (issue 10):
Orthanc, MLServer, the requesting site's DSF FHIR server (and so its websocket) and the
bridges' PostgreSQL connections go away while the request runs, and come back within the retry
budget or stay away. Each request must end as the process models say
(``bpmn/inference-request.bpmn``, ``bpmn/inference-execution.bpmn``): completed with its
result, or the start Task ``failed`` with the provider's error kind and a message an operator
can act on; the providing instance answers and ends either way.

Orthanc and MLServer are this module's own real processes, stopped and started again on the
same port with the same storage (a failing test cannot leave the session's components down for
the tests after it). Outages are placed, not raced: one starts before the providing bridge
reaches the component and ends only after the bridge logged a failed attempt
(``dicomweb.retried``, ``inference_request.retried``, ``effect.retried``); a database goes
away from the moment a FHIR server stored a given write, before it answers it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql
from pydicom.dataset import Dataset
from sqlalchemy.engine import make_url

from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.plugins.inference import result_summary
from dsf_bridge.retry import CALL_RETRY, RetryPolicy
from dsf_bridge.sandbox.components import (
    REFERENCE_MODEL,
    MLServerProcess,
    OrthancProcess,
)
from dsf_bridge.sandbox.demo import FAST_RUNTIME, InferenceNetwork, audit_events, waiting_state
from tests.components import running
from tests.omi.data import load_ct_small

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
SERVICE = "tissue-composition"
# DESIGN 5a: the body area of CT_small.dcm in cm2.
CT_SMALL_BODY = 56.18
# The site's one policy for a call ([runtime] call_*, the default here): four tries with
# back-off of 1 + 2 + 4 s, room for an archive or a model server restarting.
CALL_ATTEMPTS = CALL_RETRY.attempts


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    yield from running(OrthancProcess(tmp_path_factory.mktemp("outage-orthanc")))


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServerProcess]:
    yield from running(
        MLServerProcess(tmp_path_factory.mktemp("outage-mlserver"), models=(REFERENCE_MODEL,))
    )


@pytest.fixture
async def study(archive: OrthancProcess, model_server: MLServerProcess) -> AsyncIterator[str]:
    """CT_small.dcm in this module's Orthanc; both components run again after the test."""
    ct_small: Dataset = load_ct_small()
    client = DicomWebArchive(archive.dicomweb_url)
    try:
        await client.store([ct_small])
    finally:
        client.close()
    try:
        yield str(ct_small.StudyInstanceUID)
    finally:
        for component in (archive, model_server):
            if not component.running:
                await asyncio.to_thread(component.start)


def _bridges(model_server: MLServerProcess) -> dict[str, Mapping[str, Any]]:
    service = {"id": SERVICE, "model_name": REFERENCE_MODEL.name}
    return {
        # The provider fetches from the archive itself (transfer = "dicomweb"): these outages
        # hit the providing bridge between its fetch and its inference. The way through DSF
        # reads the archive at the requesting site (tests/plugins/test_inference_transfer.py).
        REQUESTER: {
            "catalogue": [{"id": SERVICE, "organization": PROVIDER, "transfer": "dicomweb"}]
        },
        PROVIDER: {
            "catalogue": [{**service, "inference_url": model_server.base_url}],
        },
    }


async def _logged(
    logs: Sequence[MutableMapping[str, Any]], event: str, seconds: float = 20
) -> MutableMapping[str, Any]:
    """The first log entry named ``event``, waiting for it up to ``seconds``."""

    async def poll() -> MutableMapping[str, Any]:
        while True:
            for entry in logs:
                if entry.get("event") == event:
                    return entry
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), seconds)


def _events(logs: Sequence[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry.get("event") == event]


def _error(task: Mapping[str, Any]) -> str:
    [error] = [
        o["valueString"]
        for o in task.get("output") or []
        if o["type"]["coding"][0]["code"] == "error"
    ]
    return str(error)


async def _request(network: InferenceNetwork, archive: OrthancProcess, study: str) -> str:
    return await network.request(
        REQUESTER, study_instance_uid=study, dicomweb_endpoint=archive.dicomweb_url, service=SERVICE
    )


async def _assert_completed(network: InferenceNetwork, task: Mapping[str, Any]) -> None:
    assert task["status"] == "completed", task.get("output")
    assert result_summary(task)["body-area"]["value"] == pytest.approx(CT_SMALL_BODY, abs=0.01)
    await _assert_all_ended(network)


async def _assert_all_ended(network: InferenceNetwork) -> None:
    """The provider answered and ended; nothing waits at either site; the audit verifies."""
    await network.settled()
    assert {t["status"] for t in network.tasks(PROVIDER)} == {"completed"}
    for organization, url in network.db_urls.items():
        assert waiting_state(url) == {"running": 0, "timers": 0, "subscriptions": 0}, organization
        assert await audit_events(url) > 0, organization


# -- Orthanc ----------------------------------------------------------------------------------


async def test_an_archive_back_within_the_retries_completes_the_request(
    tmp_path: Path, archive: OrthancProcess, model_server: MLServerProcess, study: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with InferenceNetwork(tmp_path / "sites", _bridges(model_server)) as network:
            await asyncio.to_thread(archive.stop)
            task_id = await _request(network, archive, study)
            await _logged(logs, "dicomweb.retried")
            await asyncio.to_thread(archive.start)
            finished = await network.finished(REQUESTER, [task_id], 30)
            await _assert_completed(network, finished[task_id])
    assert _events(logs, "inference.executed")


async def test_an_archive_that_stays_away_fails_the_request_naming_it(
    tmp_path: Path, archive: OrthancProcess, model_server: MLServerProcess, study: str
) -> None:
    attempts = 3  # [runtime] call_attempts: 0.5 + 1 s of back-off
    runtime = dataclasses.replace(
        FAST_RUNTIME, call_retry=RetryPolicy(attempts=attempts, initial_delay=0.5)
    )
    with structlog.testing.capture_logs() as logs:
        async with InferenceNetwork(
            tmp_path / "sites", _bridges(model_server), runtime_settings=runtime
        ) as network:
            await asyncio.to_thread(archive.stop)
            task_id = await _request(network, archive, study)
            finished = await network.finished(REQUESTER, [task_id], 30)
            task = finished[task_id]
            assert task["status"] == "failed"
            error = _error(task)
            assert "provider-failed: inference failed at AI_Provider (archive-unavailable)" in error
            assert f"the DICOMweb archive at {archive.dicomweb_url} cannot be reached" in error
            # The study is the requester's own, yet an error names the archive, not the study.
            assert study not in error, error
            assert "object at 0x" not in error, error
            assert not result_summary(task)
            await _assert_all_ended(network)
    assert len(_events(logs, "dicomweb.retried")) == attempts - 1


# -- MLServer ---------------------------------------------------------------------------------


async def test_a_model_server_blip_between_fetch_and_inference_completes_the_request(
    tmp_path: Path, archive: OrthancProcess, model_server: MLServerProcess, study: str
) -> None:
    """MLServer answers the readiness check, goes away while the study is fetched, and is back
    a few seconds later: the inference POST, refused meanwhile, is tried again."""
    with structlog.testing.capture_logs() as logs:
        async with InferenceNetwork(tmp_path / "sites", _bridges(model_server)) as network:
            # The archive is down first so that the provider waits between its readiness check
            # and the fetch: MLServer is stopped there, and the archive comes back.
            await asyncio.to_thread(archive.stop)
            task_id = await _request(network, archive, study)
            await _logged(logs, "dicomweb.retried")
            await asyncio.to_thread(model_server.stop)
            await asyncio.to_thread(archive.start)
            refused = await _logged(logs, "inference_request.retried")
            await asyncio.to_thread(model_server.start)
            finished = await network.finished(REQUESTER, [task_id], 30)
            await _assert_completed(network, finished[task_id])
    assert (refused["method"], refused["error"]) == ("POST", "ConnectError")


async def test_a_model_server_that_stays_away_fails_the_request_naming_it(
    tmp_path: Path, archive: OrthancProcess, model_server: MLServerProcess, study: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with InferenceNetwork(tmp_path / "sites", _bridges(model_server)) as network:
            await asyncio.to_thread(model_server.stop)
            task_id = await _request(network, archive, study)
            finished = await network.finished(REQUESTER, [task_id], 30)
            task = finished[task_id]
            assert task["status"] == "failed"
            error = _error(task)
            assert "inference failed at AI_Provider" in error, error
            assert f"inference server {model_server.base_url} is unreachable" in error, error
            assert study not in error, error
            await _assert_all_ended(network)
    assert len(_events(logs, "inference_request.retried")) == CALL_ATTEMPTS - 1
    assert not _events(logs, "dicomweb.retrieved")  # no study fetched for a model not there


# -- the requester's DSF FHIR server and its websocket -----------------------------------------


async def test_the_requesters_fhir_server_away_while_the_provider_works_delays_the_result_only(
    tmp_path: Path, archive: OrthancProcess, model_server: MLServerProcess, study: str
) -> None:
    """The requesting site's DSF FHIR server stops (its websocket with it) while the provider
    works, and is back a few seconds later. The provider's result, refused meanwhile, is
    posted by a later try of its outbox (tries every 0.5 s here, for 10 s); the requester's
    bridge binds its websocket again, catches up and completes the request."""
    runtime = dataclasses.replace(
        FAST_RUNTIME, outbox_retry_delays=(dt.timedelta(milliseconds=500),) * 20
    )
    with structlog.testing.capture_logs() as logs:
        async with InferenceNetwork(
            tmp_path / "sites", _bridges(model_server), runtime_settings=runtime
        ) as network:
            await asyncio.to_thread(archive.stop)
            task_id = await _request(network, archive, study)
            await _logged(logs, "dicomweb.retried")
            subscription = network.running[REQUESTER].subscriptions[0]
            connections = subscription.connections
            async with network.server_away(REQUESTER):
                await asyncio.to_thread(archive.start)
                refused = await _logged(logs, "effect.retried")
            finished = await network.finished(REQUESTER, [task_id], 30)
            await _assert_completed(network, finished[task_id])
            assert subscription.connections > connections, "the websocket was bound again"
    assert refused["kind"] == "send-task"
    assert len(_events(logs, "task.sent")) == 2, "one request, one result, nothing twice"


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture
def second_postgres_url(postgres_server: str) -> Iterator[str]:
    """One more fresh PostgreSQL database (``postgres_url`` gives one per test)."""
    admin = _admin(postgres_server)
    name = f"dsfb_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(postgres_server).set(database=name).render_as_string(False)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def databases(postgres_url: str, second_postgres_url: str) -> dict[str, str]:
    """A fresh PostgreSQL database for each bridge."""
    return {REQUESTER: postgres_url, PROVIDER: second_postgres_url}


def _admin(url: str) -> str:
    """A libpq connection string for the server's maintenance database."""
    return make_url(url).set(drivername="postgresql", database="postgres").render_as_string(False)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(False)


def _database(url: str) -> str:
    return str(make_url(url).database)


def _terminate_backends(admin: str, databases: list[str]) -> int:
    """``pg_terminate_backend`` every other connection to ``databases``; how many it ended."""
    with psycopg.connect(admin, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
            [databases],
        ).fetchall()
    return sum(1 for (ended,) in rows if ended)


def _allow_connections(admin: str, database: str, allowed: bool) -> None:
    """Let a database take new connections or not; refusing also ends those it has (a
    server restart or fail-over, as the bridge sees it)."""
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.SQL("true" if allowed else "false")
            )
        )
    if not allowed:
        _terminate_backends(admin, [database])


def _pg_network(
    tmp_path: Path, model_server: MLServerProcess, urls: Mapping[str, str], **options: Any
) -> InferenceNetwork:
    return InferenceNetwork(tmp_path / "sites", _bridges(model_server), databases=urls, **options)


async def test_connections_terminated_while_the_provider_works_do_not_stop_the_request(
    tmp_path: Path,
    archive: OrthancProcess,
    model_server: MLServerProcess,
    study: str,
    databases: dict[str, str],
) -> None:
    """Both bridges on PostgreSQL. While the provider's fetch waits for the archive, every
    connection of both bridges is terminated again and again (the requester waits for the
    result meanwhile): the request completes, and both bridges go on taking requests."""
    urls = databases
    admin, names = _admin(urls[REQUESTER]), [_database(url) for url in urls.values()]
    with structlog.testing.capture_logs() as logs:
        async with _pg_network(tmp_path, model_server, urls) as network:
            await asyncio.to_thread(archive.stop)
            task_id = await _request(network, archive, study)
            await _logged(logs, "dicomweb.retried")
            ended = 0
            for _ in range(10):
                ended += await asyncio.to_thread(_terminate_backends, admin, names)
                await asyncio.sleep(0.1)
            await asyncio.to_thread(archive.start)
            finished = await network.finished(REQUESTER, [task_id], 30)
            assert ended >= 2, "the bridges had connections to terminate"
            assert not any(runner.done() for runner in network._runners)
            await _assert_completed(network, finished[task_id])
            # Afterwards, connections of the pool that died idle are replaced (pinged after idling).
            ended = await asyncio.to_thread(_terminate_backends, admin, names)
            again = await _request(network, archive, study)
            finished = await network.finished(REQUESTER, [again], 30)
            await _assert_completed(network, finished[again])
    assert ended >= 2


async def _set_within(event: asyncio.Event, seconds: float) -> None:
    # Not a TimeoutError: the expected failure below is the request's, not the set-up's.
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        raise AssertionError(f"the write to wait for did not come within {seconds} s") from None


def _once_written(network: InferenceNetwork, organization: str, hook: Any) -> asyncio.Event:
    """Run ``hook`` on each resource ``organization``'s FHIR server stores, inside the write
    (before the server answers it), until it returns True; the event is set then."""
    done = asyncio.Event()
    store = network.servers[organization].service.store

    def listener(resource: dict[str, Any]) -> None:
        if not done.is_set() and hook(resource):
            done.set()
            store.remove_listener(listener)

    store.add_listener(listener)
    return done


async def _database_away_after(
    network: InferenceNetwork,
    organization: str,
    status: str,
    *,
    db_url: str,
    archive: OrthancProcess,
    study: str,
) -> str:
    """Start a request; the moment ``organization``'s server stores a Task with ``status``,
    the database at ``db_url`` refuses connections, for a second. Returns the start Task."""
    admin, name = _admin(db_url), _database(db_url)

    def written(resource: dict[str, Any]) -> bool:
        if resource.get("resourceType") == "Task" and resource.get("status") == status:
            _allow_connections(admin, name, allowed=False)
            return True
        return False

    seen = _once_written(network, organization, written)
    try:
        task_id = await _request(network, archive, study)
        await _set_within(seen, 10)
        await asyncio.sleep(1)
    finally:
        await asyncio.to_thread(_allow_connections, admin, name, True)
    return task_id


async def test_a_database_away_right_after_a_send_repeats_no_send(
    tmp_path: Path,
    archive: OrthancProcess,
    model_server: MLServerProcess,
    study: str,
    databases: dict[str, str],
) -> None:
    """The requester's database refuses connections from the moment the provider's server has
    stored the request until a second later: the requester cannot record the send it made.
    The send's lease is given back at once (or, if the store is still away then, runs out:
    shortened here from 60 s to 3 s); the next try finds the request it posted, and the
    request completes with one request on the wire."""
    urls = databases
    runtime = dataclasses.replace(FAST_RUNTIME, lease=dt.timedelta(seconds=3))
    async with _pg_network(tmp_path, model_server, urls, runtime_settings=runtime) as network:
        task_id = await _database_away_after(
            network, PROVIDER, "requested", db_url=urls[REQUESTER], archive=archive, study=study
        )
        finished = await network.finished(REQUESTER, [task_id], 20)
        await _assert_completed(network, finished[task_id])
        assert len(network.tasks(PROVIDER)) == 1, "the repeated send found the first request"
        with psycopg.connect(_libpq(urls[REQUESTER])) as connection:
            [(attempts,)] = connection.execute(
                "SELECT attempts FROM outbox WHERE kind = 'send-task'"
            ).fetchall()
        assert attempts == 2, "the send was made, not recorded, and made again"


async def test_a_database_away_while_a_task_is_taken_in_leaves_no_task_in_progress(
    tmp_path: Path,
    archive: OrthancProcess,
    model_server: MLServerProcess,
    study: str,
    databases: dict[str, str],
) -> None:
    """The requester's database refuses connections from the moment its server stored the
    start Task ``in-progress`` (the intake's PUT) until a second later: the intake cannot
    record the instance it starts. The running bridge must take the claim up again."""
    urls = databases
    async with _pg_network(tmp_path, model_server, urls) as network:
        task_id = await _database_away_after(
            network, REQUESTER, "in-progress", db_url=urls[REQUESTER], archive=archive, study=study
        )
        finished = await network.finished(REQUESTER, [task_id], 20)
        await _assert_completed(network, finished[task_id])
