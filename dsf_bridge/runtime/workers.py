"""The daemon's worker loop: rounds of due work (timers, jobs, the outbox), a sleep until new
work wakes it or the next poll, and a graceful stop in temporal's style.

Once stopped, no new round starts; a round under way may finish within the grace period, after
which it is cancelled (its transactions roll back, as in a crash). Then every lease the worker
still holds is given back, so that a restarted bridge or another replica takes the work at once
instead of after the lease. The loop never raises a :class:`~dsf_bridge.errors.BridgeError` of
a round: it logs it and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable, Iterable

import structlog

from dsf_bridge.errors import BridgeError
from dsf_bridge.store import Database, seal_events
from dsf_bridge.store import repository as repo
from dsf_bridge.store.audit import SEAL_BATCH

__all__ = ["Dispatcher", "WorkerLoop", "release_leases", "run_all", "seal_all", "seal_forever"]

log = structlog.get_logger("dsf_bridge.runtime")


class Dispatcher:
    """Runs work handed over after a commit (the jobs and effects a step queued leased to this
    bridge) in tasks of its own, next to the worker loop's rounds, without a polling round.

    A failure is logged as a round's would be; the lease it holds runs out or is given back,
    and a round takes the work up again. Once closed, nothing new starts: work handed over
    then keeps its lease until the loop gives every lease back.
    """

    def __init__(self, limit: int = 50) -> None:
        """``limit``: how many pieces of work may run at once; past it, :meth:`has_room`
        answers ``False`` and new work is left to the rounds."""
        self._running: set[asyncio.Task[None]] = set()
        self.open = False
        self.limit = limit

    def has_room(self) -> bool:
        return self.open and len(self._running) < self.limit

    def spawn(self, work: Awaitable[None]) -> bool:
        """Start ``work`` now; ``False`` (and ``work`` closed unrun) once closed."""
        if not self.open:
            if asyncio.iscoroutine(work):
                work.close()
            return False
        task = asyncio.ensure_future(self._logged(work))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    @staticmethod
    async def _logged(work: Awaitable[None]) -> None:
        try:
            await work
        except BridgeError as exc:
            log.warning("worker.failed", error=str(exc), retryable=exc.retryable)
        except Exception:  # one bad piece of work must not stop the others: a round retries it
            log.exception("worker.crashed")

    @property
    def running(self) -> int:
        return len(self._running)

    async def close(self, grace: float) -> None:
        """Start nothing more; let what runs finish within ``grace`` seconds, then cancel it
        and wait until it has unwound (its transactions rolled back)."""
        self.open = False
        if not self._running:
            return
        log.info("worker.draining", grace_seconds=grace, dispatched=len(self._running))
        _done, late = await asyncio.wait(set(self._running), timeout=max(grace, 0.0))
        if late:
            log.warning("worker.drain_timeout", grace_seconds=grace, dispatched=len(late))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


class WorkerLoop:
    """Runs ``run_once`` (one round, returning how much it did) until stopped.

    ``wakeup`` ends a sleep early (work committed elsewhere); ``idle_poll`` bounds a sleep;
    ``grace`` is how long a round may go on after the stop; the leases of ``owner`` in
    ``database`` are given back at the end. ``heartbeat`` is when the last round that did not
    fail ended.
    """

    def __init__(
        self,
        run_once: Callable[[], Awaitable[int]],
        *,
        database: Database,
        owner: str,
        wakeup: asyncio.Event,
        idle_poll: dt.timedelta,
        grace: dt.timedelta,
        clock: Callable[[], dt.datetime],
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.run_once = run_once
        self.dispatcher = dispatcher
        self.database = database
        self.owner = owner
        self.wakeup = wakeup
        self.idle_poll = idle_poll.total_seconds()
        self.grace = grace.total_seconds()
        self.clock = clock
        self.heartbeat: dt.datetime | None = None

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        stopped_at: list[float] = []

        async def note_stop() -> None:
            await stop.wait()
            stopped_at.append(loop.time())

        watcher = asyncio.ensure_future(note_stop())
        if self.dispatcher is not None:
            self.dispatcher.open = True
        try:
            await self._work_until(stop)
        finally:
            watcher.cancel()
            if self.dispatcher is not None:
                # The work handed over after commits drains within the same grace as the round;
                # a loop cancelled outright cancels it at once.
                left = self.grace - (loop.time() - stopped_at[0]) if stopped_at else 0.0
                await self.dispatcher.close(left)
            await self._release_leases()

    async def _work_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Cleared before the round, not after: work committed while the round runs (a Task
            # taken in by the subscription, say) must wake the next round, not wait for the poll.
            self.wakeup.clear()
            try:
                done = await self._round(stop)
            except BridgeError as exc:
                log.warning("worker.failed", error=str(exc), retryable=exc.retryable)
                done = 0
            except Exception:
                # A bug that escaped a piece of a round's work (jobs, effects and timers catch
                # their own) must not stop the site: the round's other work has run to its end
                # (run_all, and the leased work after the timers), the piece keeps its lease
                # until it runs out, and the loop goes on, as for the work run after a commit
                # (Dispatcher). Not a sign of life either.
                log.exception("worker.crashed")
                done = 0
            else:
                # Only a round that did not fail is a sign of life: a store that fails every
                # round must turn /ready red, not keep it green.
                self.heartbeat = self.clock()
            if done:
                continue
            sleeper = asyncio.ensure_future(self.wakeup.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait(
                    {sleeper, stopper}, timeout=self.idle_poll, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                sleeper.cancel()
                stopper.cancel()

    async def _round(self, stop: asyncio.Event) -> int:
        """One round, drained within the grace period when ``stop`` is set meanwhile."""
        work = asyncio.ensure_future(self.run_once())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                log.info("worker.draining", grace_seconds=self.grace)
                await asyncio.wait({work}, timeout=self.grace)
            if not work.done():
                log.warning("worker.drain_timeout", grace_seconds=self.grace)
                await _cancelled(work)
                return 0
            return work.result()
        finally:
            stopper.cancel()
            if not work.done():  # the loop itself was cancelled: the round unwinds first
                await _cancelled(work)

    async def _release_leases(self) -> None:
        await release_leases(self.database, self.owner)


async def release_leases(database: Database, owner: str) -> int:
    """Give back every job and outbox lease of ``owner`` (a stopping bridge), then seal the
    audit events; return how many leases. A store that is gone keeps them until they run
    out."""
    try:
        async with database.transaction() as session:
            released = await repo.release_leases(session, owner)
    except BridgeError as exc:  # the store is gone: the leases run out instead
        log.warning("worker.leases_kept", error=str(exc))
        return 0
    if released:
        log.info("worker.leases_released", count=released)
    await seal_all(database, wait=True)
    return released


async def seal_all(database: Database, *, batches: int = 10, wait: bool = False) -> int:
    """Seal the unsealed audit events, a batch per transaction, ``batches`` at most (a
    stopping bridge must not outlast its orchestrator's patience); return how many.
    ``wait``: for a sealer at work elsewhere, rather than leave the events to it."""
    sealed = 0
    try:
        for _ in range(batches):
            async with database.transaction() as session:
                count = await seal_events(session, limit=SEAL_BATCH, wait=wait)
            sealed += count
            if count < SEAL_BATCH:
                break
    except BridgeError as exc:  # the next round, or the next start, seals them
        log.warning("audit.seal_failed", error=str(exc))
    return sealed


async def seal_forever(database: Database, stop: asyncio.Event, every: float) -> None:
    """Seal what was appended every ``every`` seconds until ``stop``, apart from the rounds
    (a round that runs a long job must not hold the sealing up)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(every, 0.05))
        if not stop.is_set():
            try:
                await seal_all(database)
            except Exception:  # a bug must not end the sealing for good: logged, tried again
                log.exception("audit.seal_crashed")


async def _cancelled(work: asyncio.Future[int]) -> None:
    """Cancel ``work`` and wait until it has unwound (its transactions rolled back), so that
    the leases are given back after, not during, its rollback. A cancellation of the caller
    meanwhile is not swallowed."""
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)


async def run_all(work: Iterable[Awaitable[None]]) -> None:
    """Run all of ``work`` to the end, then raise the first failure, if any (a later one that
    is no :class:`BridgeError`, a bug, is logged first: raising one alone would hide it)."""
    results = await asyncio.gather(*work, return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    for failure in failures[1:]:
        if isinstance(failure, Exception) and not isinstance(failure, BridgeError):
            log.error("worker.crashed", exc_info=failure)
    if failures:
        raise failures[0]
