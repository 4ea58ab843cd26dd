"""What the admin routes share: the store, the readiness probes, the clock, the site's name, the
process models (for diagrams) and, beside a running bridge, a reader of the FHIR server's
Tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from fastapi import HTTPException

from dsf_bridge.api.diagram import DiagramLibrary
from dsf_bridge.api.fhir import ServerTask, TaskReader
from dsf_bridge.api.probes import Clock, Probe, ProbeResult, database_probe, utcnow
from dsf_bridge.errors import ProcessExecutionError, StoreError
from dsf_bridge.store import ChainReport, Database, Session, verify_chain
from dsf_bridge.store.queries import TaskRow

__all__ = ["ApiContext"]

T = TypeVar("T")

log = structlog.get_logger("dsf_bridge.api")

PROBE_TIMEOUT = 5.0


class ApiContext:
    """What the routes share: the store, the probes, the clock, the site's name."""

    def __init__(
        self,
        database: Database,
        probes: Sequence[Probe],
        *,
        clock: Clock = utcnow,
        site: str | None = None,
        operator_database: Database | None = None,
        diagrams: DiagramLibrary | None = None,
        task_reader: TaskReader | None = None,
    ) -> None:
        self.database = database
        # A writable connection for the operator's requests alone; every read goes through
        # ``database``, which cannot write.
        self.operator_database = operator_database
        self.probes = [database_probe(database), *probes]
        self.clock = clock
        self.site = site
        self.diagrams = diagrams if diagrams is not None else DiagramLibrary()
        # Set by ``dsf-bridge run`` once the bridge's FHIR client exists; None: the store's word.
        self.task_reader = task_reader

    async def run_probes(self) -> list[tuple[Probe, ProbeResult]]:
        """Every probe, each given :data:`PROBE_TIMEOUT` seconds.

        A probe still running then is reported failed and left to finish in the background:
        a database call in a driver thread cannot be cancelled, and waiting for it would hold
        the answer up for as long as the database hangs.
        """
        tasks = [asyncio.ensure_future(probe.check()) for probe in self.probes]
        await asyncio.wait(tasks, timeout=PROBE_TIMEOUT)
        results = []
        for task in tasks:
            if task.done():
                error = task.exception()
                results.append(
                    task.result() if error is None else ProbeResult(False, f"probe failed: {error}")
                )
            else:
                task.add_done_callback(_discard)
                results.append(ProbeResult(False, f"no answer within {PROBE_TIMEOUT:.0f} s"))
        return list(zip(self.probes, results, strict=True))

    async def read(self, query: Callable[[Session], Awaitable[T]]) -> T:
        """Run one read-only query in its own transaction."""
        async with self.database.transaction() as session:
            return await query(session)

    async def read_within(
        self, query: Callable[[Session], Awaitable[T]], seconds: float = PROBE_TIMEOUT
    ) -> T | None:
        """:meth:`read`, or ``None`` when the store fails or has not answered within
        ``seconds`` (the query is cancelled then): for ``/metrics``, whose scrape must
        still report the failing probes while the store hangs."""
        task = asyncio.ensure_future(self.read(query))
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            task.cancel()
            task.add_done_callback(_discard)
            return None
        try:
            return task.result()
        except StoreError:
            return None

    async def write(self, work: Callable[[Session], Awaitable[T]]) -> T:
        """Run one write (an operator request) in its own transaction, over the operator's
        connection (:class:`StoreError` when there is none)."""
        if self.operator_database is None:
            raise StoreError("operator requests need a writable store connection; none given")
        async with self.operator_database.transaction() as session:
            return await work(session)

    async def server_tasks(self, rows: Sequence[TaskRow]) -> dict[str, ServerTask | str]:
        """The FHIR server's word on the Tasks of ``rows`` taken in (those live on the site's
        own server; Tasks sent live on the recipient's), or why there is none: an empty reason
        when the API has no reader (``dsf-bridge api serve``, the demo)."""
        ids = [row.task_id for row in rows if row.role == "incoming"]
        if not ids:
            return {}
        if self.task_reader is None:
            return dict.fromkeys(ids, "")
        return await self.task_reader.read_many(ids)

    async def queue(
        self, work: Callable[[Session], Awaitable[int]], instance_id: str, action: str, actor: str
    ) -> int:
        """Queue an operator's request (``work`` from :mod:`dsf_bridge.runtime.operations`)
        and return its job: 404 for an unknown instance, 409 when it does not apply."""
        try:
            job = await self.write(work)
        except ProcessExecutionError as exc:
            code = 404 if exc.message.startswith("no instance") else 409
            raise HTTPException(code, exc.message) from exc
        log.info("operator.requested", action=action, instance_id=instance_id, actor=actor)
        return job

    async def verify_chain(self) -> ChainReport:
        """Walk the whole audit hash chain (as ``dsf-bridge audit verify``)."""
        return await self.read(verify_chain)


def _discard(task: asyncio.Future[Any]) -> None:
    """Collect the late outcome of a probe or query so that asyncio does not report it as
    lost."""
    if not task.cancelled():
        task.exception()
