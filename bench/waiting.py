"""Benchmark: what a Task's business-key lookups cost with many instances waiting.

Every Task asks the store whether a running instance has its business key: a start message
inserts its instance unless one runs (``repository.create_instance(unless_running=True)``), a
reply is checked against running instances and sends in flight
(``running_with_business_key``, ``sends_in_flight``). These must cost the same whether ten or
100,000 instances wait for their replies (DSF processes wait for days). This bench runs those
three statements, each in a transaction of its own as the bridge does, through the
repository's own functions, on two stores side by side: an empty one and one with ``--waiting``
running instances (by default 50,000), in alternating blocks (ABBA), and reports CPU (this
process) and wall time per lookup set for each, then ``waiting_vs_empty_cpu=`` and last
``waiting_vs_empty_wall=``, the medians of the per-round ratios (1.0: the waiting instances cost
nothing; on PostgreSQL the server's work shows in the wall time only).

Run: ``python bench/waiting.py`` (SQLite, about 30 seconds) or ``python bench/waiting.py --db
postgresql`` (a throw-away database on ``--postgres-url``). Without statistics, as a bridge
leaves its store, unless ``--analyze``.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from sqlalchemy import create_engine, insert, text

from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from dsf_bridge.store.migrations import upgrade
from dsf_bridge.store.tables import ProcessInstance

T0 = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
BATCH = 5_000


async def _prepare(url: str, waiting: int, analyze: bool) -> tuple[Database, int]:
    upgrade(url)
    database = Database(url)
    async with database.transaction() as session:
        definition_id = await repo.deploy_definition(
            session, process_key="bench_wait", version="1", plugin="bench", model_hash="a" * 64
        )
        for first in range(0, waiting, BATCH):
            rows = [
                {
                    "id": f"w-{n}",
                    "definition_id": definition_id,
                    "business_key": f"bk-{n}",
                    "status": "running",
                    "state": {"v": 1, "tokens": []},
                    "version": 1,
                    "created_at": T0,
                    "updated_at": T0,
                }
                for n in range(first, min(first + BATCH, waiting))
            ]
            await session.execute(insert(ProcessInstance), rows)
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
                state={"v": 1, "tokens": []},
                now=T0,
                unless_running=True,
            )
        async with database.transaction() as session:
            await repo.running_with_business_key(session, definition_id, f"bk-{n}")
        async with database.transaction() as session:
            await repo.sends_in_flight(session, f"bk-{n}")
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


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
    names = [f"bench_waiting_{os.getpid()}_{side}" for side in ("empty", "waiting")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.db == "sqlite":
            urls = [f"sqlite:///{Path(tmp) / name}.db" for name in names]
        else:
            server = args.postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
            urls = [_postgres_database(server, name) for name in names]
        try:
            empty = await _prepare(urls[0], 0, args.analyze)
            waiting = await _prepare(urls[1], args.waiting, args.analyze)
            sides = {"empty": empty, "waiting": waiting}
            await _block(*empty, 20)  # warm-up: statement caches, connections
            await _block(*waiting, 20)
            cpu: dict[str, list[float]] = {"empty": [], "waiting": []}
            wall: dict[str, list[float]] = {"empty": [], "waiting": []}
            for round_ in range(args.rounds):
                order = ("empty", "waiting") if round_ % 2 == 0 else ("waiting", "empty")
                for side in order:
                    used, took = await _block(*sides[side], args.count)
                    cpu[side].append(used)
                    wall[side].append(took)
            for database, _ in sides.values():
                await database.dispose()
        finally:
            if args.db == "postgresql":
                for name in names:
                    _drop_postgres(server, name)
    print(f"db={args.db} waiting={args.waiting} analyzed={str(args.analyze).lower()}")
    for side in ("empty", "waiting"):
        print(f"{side}_cpu_ms_per_lookup_set={statistics.median(cpu[side]) * 1e3:.3f}")
        print(f"{side}_wall_ms_per_lookup_set={statistics.median(wall[side]) * 1e3:.3f}")
    for name, figures in (("cpu", cpu), ("wall", wall)):
        ratios = [w / e for w, e in zip(figures["waiting"], figures["empty"], strict=True)]
        print(f"waiting_vs_empty_{name}={statistics.median(ratios):.2f}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark: a Task's business-key lookups with many instances waiting "
        "against an empty store, side by side.",
        epilog="Prints one key=value line per figure and last waiting_vs_empty_cpu= and "
        "waiting_vs_empty_wall= (time per lookup set with --waiting instances over that of an "
        "empty store).",
    )
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--waiting", type=int, default=50_000, help="running instances (default 50,000)"
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
