"""Benchmark: what a Task's business-key lookups cost with many instances waiting.

Every Task asks the store whether a running instance has its business key: a start message
inserts its instance unless one runs (``repository.create_instance(unless_running=True)``), a
reply is checked against running instances and sends in flight
(``running_with_business_key``, ``sends_in_flight``). These must cost the same whether ten or
100,000 instances wait for their replies (DSF processes wait for days). This bench runs those
three statements, each in a transaction of its own as the bridge does, through the
repository's own functions, on two stores side by side: a small one (100 running instances)
and one with ``--waiting`` running instances (by default 50,000) and as many completed ones,
one in a hundred with an alternative business key, and 5,000 sends pending (a target site
down), in alternating blocks (ABBA). Both sides look up the same keys of running instances (the
first hundred) and start instances with new keys (which stay: each store gains about 1,300
instances in a run). It reports CPU (this process) and wall time per lookup set for each, then
``waiting_vs_small_cpu=`` and last ``waiting_vs_small_wall=``, the medians of the per-round
ratios (1.0: the waiting instances cost nothing; on PostgreSQL the server's work shows in the
wall time only). It also reads the store's counts (what ``/metrics`` reads at every scrape,
``queries.count_store``) on both, with each instance's Task version in the history, and
reports the wall time per reading and ``waiting_vs_small_store_count_wall=``: this one grows
with the store (whole-table counts), but should read indexes, not rows. Last it reads the
admin API's first two pages of instances and of Task versions, newest first
(``queries.list_instances``, ``queries.list_tasks``), and reports
``waiting_vs_small_list_pages_wall=`` (1.0: a page costs the same however large the store).

Run: ``python bench/waiting.py`` (SQLite, about 10 seconds) or ``python bench/waiting.py --db
postgresql`` (throw-away databases on ``--postgres-url``, about 20 seconds). Without statistics,
as a bridge leaves its store, unless ``--analyze``. To measure another version of the bridge,
run a copy of this script placed in that version's checkout: it imports the ``dsf_bridge`` next
to it, whatever ``PYTHONPATH`` says.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from sqlalchemy import create_engine, insert, text

from dsf_bridge.store import Database, queries
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import OutboxKind, TaskSeenStatus
from dsf_bridge.store.migrations import upgrade
from dsf_bridge.store.tables import OutboxEntry, ProcessInstance, TaskSeen

T0 = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
BATCH = 5_000


STATE = {"v": 1, "tk": {"1": {"p": "w"}}, "vars": {"note": "x" * 900}, "sc": {}, "j": {}}
BACKLOG = 5_000  # pending sends in the waiting store
SMALL = 100  # running instances of the small store, and the keys both sides look up
PAGE = 51  # rows per admin API page, as the web page asks (50 and one to know of a next)


async def _prepare(url: str, running: int, completed: int, analyze: bool) -> tuple[Database, int]:
    upgrade(url)
    database = Database(url)
    async with database.transaction() as session:
        definition_id = await repo.deploy_definition(
            session, process_key="bench_wait", version="1", plugin="bench", model_hash="a" * 64
        )
        # Running first (the keys looked up are among them), then the completed ones.
        total = running + completed
        for first in range(0, total, BATCH):
            rows = [
                {
                    "id": f"w-{n}",
                    "definition_id": definition_id,
                    "business_key": f"bk-{n}",
                    "alternative_business_key": f"alt-{n}" if n % 100 == 99 else None,
                    "status": "running" if n < running else "completed",
                    # A waiting instance's state, about 1 KB: a token, some variables.
                    "state": STATE,
                    "version": 1,
                    # One after the other, as they were created (the admin API's pages
                    # read them newest first).
                    "created_at": T0 + dt.timedelta(milliseconds=n),
                    "updated_at": T0,
                    "ended_at": None
                    if n < running
                    else T0 + dt.timedelta(milliseconds=n, seconds=9),
                }
                for n in range(first, min(first + BATCH, total))
            ]
            await session.execute(insert(ProcessInstance), rows)
            # Each instance's Task as intake recorded it (the history /metrics counts).
            seen = [
                {
                    "task_id": f"t-{n}",
                    "task_version": "1",
                    "role": "incoming",
                    "status": TaskSeenStatus.TAKEN_IN,
                    "instance_id": f"w-{n}",
                    "seen_at": T0 + dt.timedelta(milliseconds=n),
                }
                for n in range(first, min(first + BATCH, total))
            ]
            await session.execute(insert(TaskSeen), seen)
        if completed:
            # A backlog of sends (a target site down), for instances not looked up.
            backlog = [
                {
                    "idempotency_key": f"send-{n}",
                    "instance_id": f"w-{n}",
                    "kind": OutboxKind.SEND_TASK,
                    "payload": {},
                    "status": "pending",
                    "next_attempt_at": T0,
                    "created_at": T0,
                }
                for n in range(SMALL, SMALL + BACKLOG)
            ]
            await session.execute(insert(OutboxEntry), backlog)
    if analyze:
        async with database.autocommit() as session:
            await session.execute(text("ANALYZE"))
    return database, definition_id


async def _block(database: Database, definition_id: int, count: int) -> tuple[float, float]:
    """CPU and wall seconds per start message plus reply lookups, over ``count`` of them."""
    cpu, wall = time.process_time(), time.perf_counter()
    for n in range(count):
        async with database.transaction() as session:
            await repo.create_instance(
                session,
                instance_id=str(uuid.uuid4()),
                definition_id=definition_id,
                business_key=f"new-{uuid.uuid4()}",
                status="running",
                state=STATE,
                now=T0,
                unless_running=True,
            )
        async with database.transaction() as session:
            key = f"bk-{n % SMALL}"
            if not await repo.running_with_business_key(session, definition_id, key):
                raise RuntimeError(f"the running instance with {key} was not found")
        async with database.transaction() as session:
            await repo.sends_in_flight(session, f"bk-{n % SMALL}")
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


async def _counts(database: Database, count: int) -> tuple[float, float]:
    """CPU and wall seconds per reading of the store's counts (what /metrics reads)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        async with database.transaction() as session:
            await queries.count_store(session, T0)
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


async def _pages(database: Database, count: int) -> tuple[float, float]:
    """CPU and wall seconds per reading of the admin API's first two pages of instances and of
    Task versions, newest first (what the web page shows first)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        async with database.transaction() as session:
            instances = await queries.list_instances(session, limit=PAGE)
            await queries.list_instances(session, before=instances[-1].id, limit=PAGE)
            tasks = await queries.list_tasks(session, limit=PAGE)
            await queries.list_tasks(session, before=queries.task_cursor(tasks[-1]), limit=PAGE)
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


async def _heartbeats(database: Database, count: int) -> tuple[float, float]:
    """CPU and wall seconds per reading of a process's load (running instances, how long the
    latest completed ones took): what an OMI provider's heartbeat reads every interval."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        async with database.autocommit() as session:
            await queries.process_load(session, "bench_wait", recent=20)
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


async def _alternating(
    sides: dict[str, tuple[Database, int]],
    rounds: int,
    reading: Callable[[Database, int], Awaitable[tuple[float, float]]],
) -> dict[str, list[float]]:
    """Wall seconds per ``reading`` (five each) on both stores, ``rounds`` times, alternating
    which goes first."""
    walls: dict[str, list[float]] = {"small": [], "waiting": []}
    for round_ in range(rounds):
        order = ("small", "waiting") if round_ % 2 == 0 else ("waiting", "small")
        for side in order:
            walls[side].append((await reading(sides[side][0], 5))[1])
    return walls


def _postgres_database(server: str, name: str) -> str:
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres(server: str, name: str) -> None:
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


async def main(args: argparse.Namespace) -> int:
    if args.waiting < SMALL:
        print(f"--waiting: at least {SMALL}", file=sys.stderr)
        return 2
    names = [f"bench_waiting_{os.getpid()}_{side}" for side in ("small", "waiting")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.db == "sqlite":
            urls = [f"sqlite:///{Path(tmp) / name}.db" for name in names]
        else:
            server = args.postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
            urls = [_postgres_database(server, name) for name in names]
        try:
            small = await _prepare(urls[0], SMALL, 0, args.analyze)
            waiting = await _prepare(urls[1], args.waiting, args.waiting, args.analyze)
            sides = {"small": small, "waiting": waiting}
            await _block(*small, 20)  # warm-up: statement caches, connections
            await _block(*waiting, 20)
            cpu: dict[str, list[float]] = {"small": [], "waiting": []}
            wall: dict[str, list[float]] = {"small": [], "waiting": []}
            for round_ in range(args.rounds):
                order = ("small", "waiting") if round_ % 2 == 0 else ("waiting", "small")
                for side in order:
                    used, took = await _block(*sides[side], args.count)
                    cpu[side].append(used)
                    wall[side].append(took)
            readings = {
                name: await _alternating(sides, args.rounds, reading)
                for name, reading in (
                    ("store_count", _counts),
                    ("list_pages", _pages),
                    ("heartbeat_load", _heartbeats),
                )
            }
            for database, _ in sides.values():
                await database.dispose()
        finally:
            if args.db == "postgresql":
                for name in names:
                    _drop_postgres(server, name)
    print(f"db={args.db} waiting={args.waiting} analyzed={str(args.analyze).lower()}")
    for side in ("small", "waiting"):
        print(f"{side}_cpu_ms_per_lookup_set={statistics.median(cpu[side]) * 1e3:.3f}")
        print(f"{side}_wall_ms_per_lookup_set={statistics.median(wall[side]) * 1e3:.3f}")
    for name, walls in readings.items():
        for side in ("small", "waiting"):
            print(f"{side}_wall_ms_per_{name}={statistics.median(walls[side]) * 1e3:.2f}")
        ratios = [w / e for w, e in zip(walls["waiting"], walls["small"], strict=True)]
        print(f"waiting_vs_small_{name}_wall={statistics.median(ratios):.1f}")
    for name, figures in (("cpu", cpu), ("wall", wall)):
        ratios = [w / e for w, e in zip(figures["waiting"], figures["small"], strict=True)]
        print(f"waiting_vs_small_{name}={statistics.median(ratios):.2f}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark: a Task's business-key lookups with many instances waiting "
        "against a store with 100, side by side.",
        epilog="Prints one key=value line per figure and last waiting_vs_small_cpu= and "
        "waiting_vs_small_wall= (time per lookup set with --waiting instances over that with "
        "100).",
    )
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--waiting",
        type=int,
        default=50_000,
        help="running instances, and as many completed (default 50,000)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--count", type=int, default=200, help="lookup sets per block")
    parser.add_argument("--analyze", action="store_true", help="run ANALYZE on both stores first")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "DSF_BRIDGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL where throw-away databases may be created and dropped",
    )
    return parser


if __name__ == "__main__":
    sys.exit(asyncio.run(main(_parser().parse_args())))
